"""The project's figures, all in one style, saved under `figures/`."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt

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


def figures_dir() -> Path:
    """Where figures go: $LLM_SCRATCH_FIGURES if set, else the `figures/` folder of the project."""
    if os.environ.get("LLM_SCRATCH_FIGURES"):
        return Path(os.environ["LLM_SCRATCH_FIGURES"])
    cwd = Path.cwd()
    return (cwd.parent if cwd.name == "notebooks" else cwd) / "figures"


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
