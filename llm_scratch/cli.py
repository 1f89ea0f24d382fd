"""`python -m llm_scratch`: fine-tune GPT-2 as an SMS spam classifier, compare methods, classify texts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file

from llm_scratch.classifier import add_classification_head, classify, evaluate
from llm_scratch.config import GPTConfig, pick_device, quick_mode
from llm_scratch.files import save_safetensors
from llm_scratch.lora import load_lora, parameter_summary, save_lora
from llm_scratch.model import GPTModel
from llm_scratch.plots import plot_accuracy, plot_comparison, plot_losses, save_figure
from llm_scratch.pretrained import load_gpt2, save_gpt2_safetensors
from llm_scratch.spam import LABELS, load_spam_splits, spam_dataloaders
from llm_scratch.training import DEFAULT_LR, METHODS, prepare_for_method, train_classifier

# Quick mode trains a tiny model with random weights from scratch, which needs larger steps than
# fine-tuning a pretrained one, and more epochs (they take milliseconds).
QUICK_LR = {"full": 2e-3, "last-block": 2e-3, "lora": 5e-3}
QUICK_EPOCHS = 8
ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's trained tensors (A, B and the head)
WEIGHTS_FILE = "weights.safetensors"  # a full or last-block run's trained tensors
RUN_FILE = "run.json"  # how to rebuild the classifier
METRICS_FILE = "metrics.json"  # what the run measured


@dataclass
class FinetuneSettings:
    """Everything one fine-tuning run depends on; the CLI's options map one to one onto these fields."""

    method: str = "lora"  # "full", "last-block" or "lora"
    model: str = "gpt2-small"  # the GPT-2 size (quick mode always uses "tiny")
    epochs: int | None = None  # None: 5, or QUICK_EPOCHS in quick mode
    out: Path | None = None  # the run folder; None: runs/METHOD
    rank: int = 16  # LoRA rank
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / rank
    lr: float | None = None  # None: DEFAULT_LR (or QUICK_LR) of the method
    batch_size: int = 8
    bucket: bool = False  # batches of similar-length messages (less padding, faster epochs)
    seed: int = 123
    device: str | None = None  # None: CUDA, then MPS, then CPU
    quick: bool = False  # tiny model, sample data, no network (also LLM_SCRATCH_QUICK=1)
    data: Path | None = None  # a local SMSSpamCollection file or UCI zip instead of the download
    weights: Path | None = None  # a local GPT-2 model.safetensors instead of the download
    random_init: bool = False  # start from random weights instead of pretrained GPT-2
    eval_every: int = 50  # steps between validation-loss checks
    progress: bool = True  # progress bars


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm_scratch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tune = commands.add_parser("finetune", help="fine-tune GPT-2 as a spam classifier and save the run")
    tune.add_argument("--method", choices=METHODS, default="lora")
    tune.add_argument("--model", default="gpt2-small", help="gpt2-small, gpt2-medium, gpt2-large or gpt2-xl")
    tune.add_argument("--epochs", type=int, default=None, help=f"default 5 ({QUICK_EPOCHS} in quick mode)")
    tune.add_argument("--out", type=Path, default=None, help="run folder (default runs/METHOD)")
    tune.add_argument("--rank", type=int, default=16, help="LoRA rank")
    tune.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha / rank)")
    tune.add_argument("--lr", type=float, default=None, help="learning rate (default: per method)")
    tune.add_argument("--batch-size", type=int, default=8)
    tune.add_argument("--bucket", action="store_true",
                      help="batch messages of similar length together: less padding, faster epochs")
    tune.add_argument("--seed", type=int, default=123)
    tune.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    tune.add_argument("--quick", action="store_true",
                      help="tiny model, sample data, no network (also LLM_SCRATCH_QUICK=1)")
    tune.add_argument("--data", type=Path, default=None,
                      help="a local SMSSpamCollection file or the UCI zip (no download)")
    tune.add_argument("--weights", type=Path, default=None,
                      help="a local GPT-2 model.safetensors file (no download)")
    tune.add_argument("--random-init", action="store_true",
                      help="start from random weights instead of pretrained GPT-2 (for tests and benchmarks)")
    tune.add_argument("--compare", action="store_true",
                      help="run full, last-block and lora one after the other and compare them")
    tune.add_argument("--eval-every", type=int, default=50, help="steps between validation-loss checks")
    tune.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    cls = commands.add_parser("classify", help="classify texts with a saved fine-tuning run")
    cls.add_argument("--run", type=Path, required=True, help="the folder a finetune run wrote")
    cls.add_argument("texts", nargs="+", help="one or more messages")
    return parser


def _base_source(args: FinetuneSettings, quick: bool, out: Path) -> dict:
    """Where the base model's weights come from, recorded in run.json so `classify` can rebuild it."""
    if quick:  # a tiny random "pretrained" model, written and read back through the real loader
        torch.manual_seed(args.seed)
        path = save_gpt2_safetensors(GPTModel(GPTConfig.from_preset("tiny")), out / "base_tiny.safetensors")
        return {"kind": "file", "model": "tiny", "path": path.name, "note": "quick mode: tiny random model"}
    if args.random_init:
        return {"kind": "random", "model": args.model, "seed": args.seed,
                "note": "random init, no pretrained weights"}
    if args.weights is not None:
        path = str(Path(args.weights).resolve())
        return {"kind": "file", "model": args.model, "path": path, "note": "pretrained"}
    return {"kind": "hub", "model": args.model, "note": "pretrained"}


def load_base(source: dict, run_dir: Path, device: torch.device) -> GPTModel:
    """The base model a run started from (pretrained, a local file, or the same random init)."""
    if source["kind"] == "hub":
        return load_gpt2(source["model"], device=device)
    if source["kind"] == "file":
        return load_gpt2(source["model"], weights_path=run_dir / source["path"], device=device)
    torch.manual_seed(source["seed"])
    return GPTModel(GPTConfig.from_preset(source["model"])).to(device)


def _setting(run: dict) -> str:
    """What a run trained on, for figure titles: e.g. "gpt2-small, SMS Spam Collection (pretrained)"."""
    return f"{run['model']}, {run['data']} ({run['base']['note']})"


def finetune(args: FinetuneSettings) -> dict:
    """Fine-tune one method end to end; write run.json, metrics.json, figures and the trained tensors.

    Returns the metrics (also written to metrics.json), e.g. `finetune(FinetuneSettings(quick=True))`.
    """
    method = args.method
    quick = args.quick or quick_mode()
    out = Path(args.out) if args.out is not None else Path("runs") / method
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    epochs = args.epochs or (QUICK_EPOCHS if quick else 5)
    lr = args.lr or (QUICK_LR if quick else DEFAULT_LR)[method]

    splits = load_spam_splits(source=args.data, quick=quick, seed=args.seed)
    source = _base_source(args, quick, out)
    model = load_base(source, out, device)
    add_classification_head(model, num_classes=len(LABELS), seed=args.seed)
    prepare_for_method(model, method, rank=args.rank, alpha=args.alpha, seed=args.seed)
    summary = parameter_summary(model, verbose=False)
    print(f"{method}: {summary}  |  device {device}  |  {source['note']}")
    loaders = spam_dataloaders(splits, batch_size=args.batch_size, context_length=model.cfg.context_length,
                               bucket=args.bucket, seed=args.seed)

    history = train_classifier(model, loaders.train, loaders.validation, epochs=epochs, lr=lr,
                               eval_every=args.eval_every, seed=args.seed, device=device,
                               progress=args.progress)
    accuracies = {f"{name}_accuracy": evaluate(model, loader)[1]
                  for name, loader in zip(("train", "validation", "test"), loaders[:3], strict=True)}

    data = "sample data" if quick and args.data is None else "SMS Spam Collection"
    run = {"method": method, "model": source["model"], "quick": quick, "data": data, "base": source,
           "labels": list(LABELS), "max_length": loaders.max_length, "rank": args.rank, "alpha": args.alpha}
    if method == "lora":
        saved = save_lora(model, out / ADAPTER_FILE, base_model=source["model"], also=("out_head",))
    else:  # the tensors that training changed: all of them (full) or the last block, final norm and head
        trained = {name: p.detach().cpu().contiguous()
                   for name, p in model.named_parameters() if p.requires_grad}
        saved = out / WEIGHTS_FILE
        save_safetensors(trained, saved, metadata={"method": method, "base_model": source["model"]})
    (out / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")

    metrics = {
        **run, **accuracies, "epochs": epochs, "lr": lr, "batch_size": args.batch_size, "bucket": args.bucket,
        "seed": args.seed, "device": str(device),
        "trainable_parameters": summary.trainable, "total_parameters": summary.base,
        "train_time_s": history.wall_time_s, "peak_memory_mb": history.peak_memory_mb,
        "peak_memory_kind": history.peak_memory_kind, "saved_file": saved.name,
        "saved_file_mb": saved.stat().st_size / 2**20, "history": history.to_dict(),
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    save_figure(plot_losses(history, f"{method} loss: {_setting(run)}"), "loss.png", out)
    save_figure(plot_accuracy(history, f"{method} accuracy: {_setting(run)}"), "accuracy.png", out)
    plt.close("all")  # the figures are in files; a long --compare would otherwise keep them all open
    train_acc, val_acc, test_acc = accuracies.values()
    print(f"{method}: train {train_acc:.1%}, validation {val_acc:.1%}, test {test_acc:.1%} accuracy "
          f"in {history.wall_time_s:.1f} s; "
          f"wrote {out}/{{{RUN_FILE}, {METRICS_FILE}, loss.png, accuracy.png, {saved.name}}}")
    return metrics


def compare(args: FinetuneSettings, methods: tuple[str, ...] = METHODS, command: str = "") -> dict[str, dict]:
    """Run several methods with the same data and seed; write comparison.md and comparison.png.

    `command`, if given, is the shell command that made the comparison, quoted under the table.
    """
    out = Path(args.out) if args.out is not None else Path("runs") / "compare"
    results = {m: finetune(dataclasses.replace(args, method=m, out=out / m)) for m in methods}
    first = next(iter(results.values()))
    setting = _setting(first)
    header = ("| method | trainable parameters | test accuracy | validation accuracy | training time | "
              "peak memory | saved file |\n|---|---:|---:|---:|---:|---:|---:|\n")
    rows = "".join(
        f"| {m} | {r['trainable_parameters']:,} of {r['total_parameters']:,} | {r['test_accuracy']:.2%} | "
        f"{r['validation_accuracy']:.2%} | {r['train_time_s']:.0f} s | {r['peak_memory_mb']:,.0f} MB | "
        f"{r['saved_file_mb']:,.1f} MB |\n" for m, r in results.items())
    note = (f"\n{setting}; {first['epochs']} epochs, batch {first['batch_size']}, seed {first['seed']}, "
            f"device {first['device']}; peak memory is the {first['peak_memory_kind']}.\n")
    if command:
        note += f"Command: `{command}`\n"
    (out / "comparison.md").write_text(header + rows + note)
    save_figure(plot_comparison(results, f"Methods compared ({setting})"), "comparison.png", out)
    plt.close("all")
    print(header + rows + note)
    return results


def load_run(run_dir: Path, device: str | None = None) -> tuple[GPTModel, dict]:
    """The fine-tuned classifier saved in `run_dir` by `finetune`, in eval mode, and its run settings."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / RUN_FILE} not found; pass the folder a finetune run wrote "
                                "(its --out)")
    run = json.loads((run_dir / RUN_FILE).read_text())
    model = load_base(run["base"], run_dir, pick_device(device))
    add_classification_head(model, num_classes=len(run["labels"]))
    if run["method"] == "lora":
        load_lora(model, run_dir / ADAPTER_FILE, base_model=run["model"])
    else:
        trained = load_file(str(run_dir / WEIGHTS_FILE), device=str(model.tok_emb.weight.device))
        unknown = sorted(set(trained) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"{run_dir / WEIGHTS_FILE} holds tensors this model lacks: {unknown[:5]}")
        model.load_state_dict(trained, strict=False)
    return model.eval(), run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "classify":
            model, run = load_run(args.run)
            for text in args.texts:
                label, prob = classify(text, model, labels=tuple(run["labels"]), max_length=run["max_length"])
                print(f"{label:>4} ({prob:.1%})  {text}")
        else:
            settings = FinetuneSettings(**{f.name: getattr(args, f.name)
                                           for f in dataclasses.fields(FinetuneSettings)})
            if args.compare:
                given = sys.argv[1:] if argv is None else argv
                compare(settings, command=" ".join(["python -m llm_scratch", *given]))
            else:
                finetune(settings)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
