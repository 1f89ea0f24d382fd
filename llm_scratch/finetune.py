"""A fine-tuning run end to end: its settings, the methods and their learning rates, `finetune`, `compare`
and `load_run`. The CLI and the notebooks call this module; it knows nothing of the command line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file

from llm_scratch.adapters import load_lora, save_lora
from llm_scratch.classifier import add_classification_head, evaluate, train_classifier
from llm_scratch.config import GPTConfig, pick_device, quick_mode
from llm_scratch.data import LABELS, load_spam_splits, spam_dataloaders
from llm_scratch.files import save_safetensors
from llm_scratch.lora import LoRAConfig, mark_only_lora_trainable, parameter_summary, replace_linear_with_lora
from llm_scratch.loraplus import loraplus_param_groups
from llm_scratch.model import GPTModel
from llm_scratch.plots import plot_accuracy, plot_comparison, plot_losses, save_figure
from llm_scratch.pretrained import load_gpt2, save_gpt2_safetensors

METHODS = ("full", "last-block", "lora", "dora")
LORA_METHODS = ("lora", "dora")  # the methods that train an adapter (DoRA: LoRA + magnitudes)
COMPARED_METHODS = ("full", "last-block", "lora")  # what `compare` runs unless told otherwise
# AdamW learning rates. Full and last-block fine-tuning move pretrained weights, so they take the small step
# usual for fine-tuning a pretrained transformer (5e-5). LoRA trains only new matrices (and the new head),
# starting from B = 0; with alpha = rank the update of W is A @ B itself, and a 10x larger step lets it grow
# in a few epochs, as is common for LoRA; DoRA, LoRA with magnitudes, takes the same. Quick mode trains a tiny
# model with random weights from scratch, which needs larger steps still, and more epochs (milliseconds).
LEARNING_RATES = {"full": 5e-5, "last-block": 5e-5, "lora": 5e-4, "dora": 5e-4}
QUICK_LEARNING_RATES = {"full": 2e-3, "last-block": 2e-3, "lora": 5e-3, "dora": 5e-3}
EPOCHS, QUICK_EPOCHS = 5, 8
QUICK_MODEL_NAME = "tiny"  # quick mode's base model: the tiny preset, random weights, no download
# LoRA for classification: beside every Linear of the blocks, and the new head trains in full.
CLASSIFIER_LORA = LoRAConfig(rank=16, alpha=16.0, modules_to_save=("out_head",))

ADAPTER_FILE = "adapter.safetensors"  # a LoRA or DoRA run's trained tensors (A, B, DoRA's m and the head)
WEIGHTS_FILE = "weights.safetensors"  # a full or last-block run's trained tensors
RUN_FILE = "run.json"  # how to rebuild the classifier
METRICS_FILE = "metrics.json"  # what the run measured


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything one fine-tuning run depends on; the CLI's options map one to one onto these fields."""

    method: str = "lora"  # "full", "last-block", "lora" or "dora"
    model_name: str = "gpt2-small"  # the GPT-2 size (quick mode always uses "tiny")
    epochs: int | None = None  # None: EPOCHS, or QUICK_EPOCHS in quick mode
    out: Path | None = None  # the run folder; None: runs/METHOD
    lora_config: LoRAConfig = CLASSIFIER_LORA  # rank, alpha, ... (methods "lora" and "dora")
    lr: float | None = None  # None: the method's LEARNING_RATES (or QUICK_LEARNING_RATES)
    loraplus_lr_ratio: float | None = None  # LoRA+: B learns at lr x this (lora, dora); None: plain LoRA
    batch_size: int = 8
    bucket: bool = False  # batches of similar-length messages (less padding, faster epochs)
    seed: int = 123
    device: str | None = None  # None: CUDA, then MPS, then CPU
    quick: bool = False  # tiny model, shipped data, no network (also LLM_SCRATCH_QUICK=1)
    data_path: Path | None = None  # a local SMSSpamCollection file or UCI zip instead of the download
    weights_path: Path | None = None  # a local GPT-2 model.safetensors instead of the download
    random_init: bool = False  # start from random weights instead of pretrained GPT-2
    eval_every: int = 50  # steps between validation-loss checks
    progress: bool = True  # progress bars


def prepare_for_method(
    model: GPTModel, method: str, lora_config: LoRAConfig = CLASSIFIER_LORA, seed: int = 123
) -> list[str]:
    """Decide which parameters train: every one (full), the last block + final norm + head (last-block),
    or new LoRA matrices where `lora_config` says + its modules_to_save (lora; dora: + DoRA's magnitudes).
    Returns the names trained.

    `seed` fixes the random start of LoRA's A matrices: the same seed, the same adapter at step 0.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in LORA_METHODS:
        torch.manual_seed(seed)
        lora_config = method_lora_config(method, lora_config)
        replace_linear_with_lora(model, lora_config)
        mark_only_lora_trainable(model, lora_config)
    else:
        trained_parts = (f"blocks.{len(model.blocks) - 1}.", "final_norm.", "out_head.")
        for name, param in model.named_parameters():
            param.requires_grad = method == "full" or name.startswith(trained_parts)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def method_lora_config(method: str, lora_config: LoRAConfig) -> LoRAConfig:
    """The LoRAConfig a LoRA method trains with: `lora_config` with use_dora set for method "dora"."""
    if method == "lora" and lora_config.use_dora:
        raise ValueError("the LoRAConfig says use_dora=True but the method is 'lora': choose method 'dora'")
    return dataclasses.replace(lora_config, use_dora=method == "dora")


def write_quick_base_model(path: Path, seed: int) -> Path:
    """Quick mode's "pretrained" model: the tiny preset with random weights, in GPT-2's file layout, so it
    is read back through the same loader as the real weights."""
    torch.manual_seed(seed)
    return save_gpt2_safetensors(GPTModel(GPTConfig.from_preset(QUICK_MODEL_NAME)), path)


def _base_source(settings: FinetuneSettings, quick: bool, out: Path) -> dict:
    """Where the base model's weights come from, recorded in run.json so `classify` can rebuild it."""
    if quick:
        path = write_quick_base_model(out / "base_tiny.safetensors", settings.seed)
        return {"kind": "file", "model_name": QUICK_MODEL_NAME, "path": path.name,
                "note": "quick mode: tiny random model"}
    if settings.random_init:
        return {"kind": "random", "model_name": settings.model_name, "seed": settings.seed,
                "note": "random init, no pretrained weights"}
    if settings.weights_path is not None:
        return {"kind": "file", "model_name": settings.model_name,
                "path": str(Path(settings.weights_path).resolve()), "note": "pretrained"}
    return {"kind": "hub", "model_name": settings.model_name, "note": "pretrained"}


def load_base(source: dict, run_dir: Path, device: torch.device) -> GPTModel:
    """The base model a run started from (pretrained, a local file, or the same random init)."""
    if source["kind"] == "hub":
        return load_gpt2(source["model_name"], device=device)
    if source["kind"] == "file":
        return load_gpt2(source["model_name"], weights_path=run_dir / source["path"], device=device)
    torch.manual_seed(source["seed"])
    return GPTModel(GPTConfig.from_preset(source["model_name"])).to(device)


def _setting(run: dict) -> str:
    """What a run trained on, for figure titles: e.g. "gpt2-small, SMS Spam Collection (pretrained)"."""
    return f"{run['model_name']}, {run['data']} ({run['base']['note']})"


def finetune(settings: FinetuneSettings) -> dict:
    """Fine-tune one method end to end; write run.json, metrics.json, figures and the trained tensors.

    Returns the metrics (also written to metrics.json), e.g. `finetune(FinetuneSettings(quick=True))`.
    """
    method, lora_config, loraplus = settings.method, settings.lora_config, settings.loraplus_lr_ratio
    if method in LORA_METHODS and "out_head" not in lora_config.modules_to_save:
        raise ValueError("the classifier's new head must train with LoRA: add 'out_head' to the LoRAConfig's "
                         "modules_to_save (the default CLASSIFIER_LORA has it)")
    if loraplus is not None and method not in LORA_METHODS:
        raise ValueError(f"LoRA+ (loraplus_lr_ratio={loraplus}) sets the learning rate of LoRA's B matrices; "
                         f"use it with method lora or dora, not {method!r}")
    if method in LORA_METHODS:
        lora_config = method_lora_config(method, lora_config)  # use_dora for "dora"
    quick = settings.quick or quick_mode()
    out = Path(settings.out) if settings.out is not None else Path("runs") / method
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(settings.device)
    epochs = settings.epochs if settings.epochs is not None else (QUICK_EPOCHS if quick else EPOCHS)
    if settings.lr is not None:
        lr = settings.lr
    else:
        lr = (QUICK_LEARNING_RATES if quick else LEARNING_RATES)[method]

    splits = load_spam_splits(data_path=settings.data_path, quick=quick, seed=settings.seed)
    source = _base_source(settings, quick, out)
    model = load_base(source, out, device)
    add_classification_head(model, num_classes=len(LABELS), seed=settings.seed)
    prepare_for_method(model, method, lora_config, seed=settings.seed)
    groups = None if loraplus is None else loraplus_param_groups(model, lr, loraplus)  # checks the ratio
    summary = parameter_summary(model, verbose=False)
    print(f"{method}: {summary}  |  device {device}  |  {source['note']}")
    loaders = spam_dataloaders(splits, batch_size=settings.batch_size,
                               context_length=model.cfg.context_length, bucket=settings.bucket,
                               seed=settings.seed)

    history = train_classifier(model, loaders.train, loaders.validation, epochs=epochs, lr=lr,
                               eval_every=settings.eval_every, seed=settings.seed, device=device,
                               progress=settings.progress, param_groups=groups)
    accuracies = {f"{name}_accuracy": evaluate(model, loader)["accuracy"]
                  for name, loader in zip(("train", "validation", "test"), loaders[:3], strict=True)}

    data = "sample data" if quick and settings.data_path is None else "SMS Spam Collection"
    run = {"method": method, "model_name": source["model_name"], "quick": quick, "data": data, "base": source,
           "labels": list(LABELS), "max_length": loaders.max_length,
           "lora_config": dataclasses.asdict(lora_config) if method in LORA_METHODS else None,
           "loraplus_lr_ratio": loraplus}
    if method in LORA_METHODS:
        saved = save_lora(model, out / ADAPTER_FILE, lora_config, model_name=source["model_name"])
    else:  # the tensors that training changed: all of them (full) or the last block, final norm and head
        trained = {name: p.detach().cpu().contiguous()
                   for name, p in model.named_parameters() if p.requires_grad}
        saved = out / WEIGHTS_FILE
        save_safetensors(trained, saved, metadata={"method": method, "model_name": source["model_name"]})
    (out / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")

    metrics = {
        **run, **accuracies, "epochs": epochs, "lr": lr, "batch_size": settings.batch_size,
        "bucket": settings.bucket, "seed": settings.seed, "device": str(device),
        "trainable_parameters": summary.trainable, "total_parameters": summary.base,
        "train_time_s": history.wall_time_s, "peak_memory_mb": history.peak_memory_mb,
        "peak_memory_kind": history.peak_memory_kind, "saved_file": saved.name,
        "saved_file_mb": saved.stat().st_size / 2**20, "history": history.to_dict(),
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    save_figure(plot_losses(history, f"{method} loss: {_setting(run)}"), "loss.png", out)
    save_figure(plot_accuracy(history, f"{method} accuracy: {_setting(run)}"), "accuracy.png", out)
    plt.close("all")  # the figures are in files; a long compare would otherwise keep them all open
    train_acc, val_acc, test_acc = accuracies.values()
    print(f"{method}: train {train_acc:.1%}, validation {val_acc:.1%}, test {test_acc:.1%} accuracy "
          f"in {history.wall_time_s:.1f} s; "
          f"wrote {out}/{{{RUN_FILE}, {METRICS_FILE}, loss.png, accuracy.png, {saved.name}}}")
    return metrics


def compare(settings: FinetuneSettings, methods: tuple[str, ...] = COMPARED_METHODS,
            command: str = "") -> dict[str, dict]:
    """Run several methods (any of METHODS) with the same data and seed; write comparison.md and .png.

    `settings.loraplus_lr_ratio` applies to the LoRA methods (lora, dora). `command`, if given, is the shell
    command that made the comparison, quoted under the table.
    """
    out = Path(settings.out) if settings.out is not None else Path("runs") / "compare"
    ratio = settings.loraplus_lr_ratio
    results = {m: finetune(dataclasses.replace(settings, method=m, out=out / m,
                                               loraplus_lr_ratio=ratio if m in LORA_METHODS else None))
               for m in methods}
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
    if ratio is not None:
        note += f"LoRA+ on the LoRA methods: B's learning rate is {ratio:g} times A's.\n"
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
    if run["method"] in LORA_METHODS:
        load_lora(model, run_dir / ADAPTER_FILE, model_name=run["model_name"])
    else:
        trained = load_file(str(run_dir / WEIGHTS_FILE), device=str(model.tok_emb.weight.device))
        unknown = sorted(set(trained) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"{run_dir / WEIGHTS_FILE} holds tensors this model lacks: {unknown[:5]}")
        model.load_state_dict(trained, strict=False)
    return model.eval(), run
