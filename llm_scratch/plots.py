"""The project's figures, all in one style, saved under `config.figures_dir()` (default `runs/figures/`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from llm_scratch.config import figures_dir

STYLE = {
    "figure.figsize": (7.0, 4.0),
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.frameon": False,
}
COLORS = {"full": "#4C72B0", "last-block": "#DD8452", "lora": "#55A868", "train": "#4C72B0",
          "validation": "#C44E52"}


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure and its axes (`plt.subplots` arguments) in the project's style."""
    plt.rcParams.update(STYLE)
    return plt.subplots(nrows, ncols, **kwargs)


def save_figure(fig, name: str, folder: str | Path | None = None) -> Path:
    """Save `fig` as PNG `name` in `folder` (default: `figures_dir()`) and return the path."""
    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def plot_losses(history, title: str = "", seen: bool = False):
    """Training loss of every step (faint), and training and validation loss at each evaluation.

    The x-axis counts what training has seen (examples or tokens, `history.unit`) when `seen` is True,
    else epochs (fractional).
    """
    fig, ax = new_figure()
    per_epoch = history.step_seen[-1] / max(len(history.epoch_metrics.get("validation_loss", [])), 1)

    def x_of(counts):  # examples or tokens seen -> the chosen x-axis
        return counts if seen else [n / per_epoch for n in counts]

    ax.plot(x_of(history.step_seen), history.step_loss, color=COLORS["train"], alpha=0.25, lw=1,
            label="training loss (each step)")
    ax.plot(x_of(history.eval_seen), history.eval_train_loss, color=COLORS["train"], marker="o", ms=3,
            label="training loss")
    ax.plot(x_of(history.eval_seen), history.eval_val_loss, color=COLORS["validation"], marker="o", ms=3,
            label="validation loss")
    ax.set_xlabel(f"{history.unit} seen" if seen else "epochs")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "Loss")
    ax.legend()
    return fig


def plot_accuracy(history, title: str = ""):
    """Training and validation accuracy after each epoch."""
    fig, ax = new_figure()
    metrics = history.epoch_metrics
    epochs = range(1, len(metrics["validation_accuracy"]) + 1)
    ax.plot(epochs, [100 * a for a in metrics["train_accuracy"]], color=COLORS["train"], marker="o",
            label="training (a few batches)")
    ax.plot(epochs, [100 * a for a in metrics["validation_accuracy"]], color=COLORS["validation"], marker="o",
            label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(list(epochs))
    ax.set_title(title or "Accuracy")
    ax.legend()
    return fig


def plot_comparison(results: dict[str, dict], title: str = ""):
    """Bars per method: trainable parameters (log scale), test accuracy with its 95% interval (the
    `test_accuracy_interval` of each result) and training time."""
    methods = list(results)
    colors = [COLORS.get(m, "gray") for m in methods]
    fig, axes = new_figure(1, 3, figsize=(11, 3.6))
    accuracies = [100 * results[m]["test_accuracy"] for m in methods]
    intervals = [[100 * bound for bound in results[m]["test_accuracy_interval"]] for m in methods]
    below_above = [[acc - low for acc, (low, _) in zip(accuracies, intervals, strict=True)],
                   [high - acc for acc, (_, high) in zip(accuracies, intervals, strict=True)]]
    panels = [
        ("trainable parameters", [results[m]["trainable_parameters"] for m in methods], "{:,.0f}", None),
        ("test accuracy (%), 95% interval", accuracies, "{:.1f}", below_above),
        ("training time (s)", [results[m]["train_time_s"] for m in methods], "{:.0f}", None),
    ]
    for ax, (label, values, fmt, errors) in zip(axes, panels, strict=True):
        bars = ax.bar(methods, values, color=colors, yerr=errors, capsize=4 if errors else 0)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8,
                     label_type="center" if errors else "edge")  # error bars sit on the edge
        ax.set_title(label)
        ax.grid(axis="x", visible=False)
    axes[0].set_yscale("log")
    fig.suptitle(title or "Fine-tuning methods compared")
    fig.tight_layout()
    return fig
