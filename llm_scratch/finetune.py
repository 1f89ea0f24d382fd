"""A fine-tuning run end to end: its settings, the methods and their learning rates, `finetune`, `compare`
and `load_run`. The CLI and the notebooks call this module; it knows nothing of the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from llm_scratch.adapters import load_lora, save_lora
from llm_scratch.classifier import (
    add_classification_head,
    classify,
    evaluate,
    format_accuracy,
    train_classifier,
    wilson_interval,
)
from llm_scratch.config import PRESETS, GPTConfig, pick_device, quick_mode
from llm_scratch.data import LABELS, load_spam_splits, spam_dataloaders
from llm_scratch.files import atomic_path, require_finite, save_safetensors
from llm_scratch.frozen_prefix import skip_frozen_prefix
from llm_scratch.lora import LoRAConfig, parameter_summary
from llm_scratch.loraplus import loraplus_param_groups
from llm_scratch.methods import (
    CLASSIFIER_LORA,
    COMPARED_METHODS,
    LEARNING_RATES,
    LORA_METHODS,
    METHODS,
    QUICK_LEARNING_RATES,
    method_lora_config,
    prepare_for_method,
)
from llm_scratch.model import GPTModel
from llm_scratch.plots import plot_accuracy, plot_comparison, plot_losses, save_figure
from llm_scratch.precision import autocast, check_precision
from llm_scratch.pretrained import download_gpt2, save_gpt2_safetensors
from llm_scratch.run_folder import (
    ADAPTER_FILE,
    METRICS_FILE,
    QUICK_BASE_FILE,
    RUN_FILE,
    WEIGHTS_FILE,
    check_fingerprint,
    fingerprint,
    load_base,
    load_trained_weights,
    read_run,
    writing_run,
)
from llm_scratch.training import NON_FINITE_CAUSES

EPOCHS, QUICK_EPOCHS = 5, 8
DEFAULT_MODEL_NAME = "gpt2-small"
QUICK_MODEL_NAME = "tiny"  # quick mode's base model: the tiny preset, random weights, no download
MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed takes
DEVICE_NAME = re.compile(r"cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything one fine-tuning run depends on; the CLI's options map one to one onto these fields."""

    method: str = "lora"  # "full", "last-block", "lora" or "dora"
    model_name: str | None = None  # the GPT-2 size; None: DEFAULT_MODEL_NAME, or "tiny" in quick mode
    epochs: int | None = None  # None: EPOCHS, or QUICK_EPOCHS in quick mode
    out: Path | None = None  # the run folder; None: runs/METHOD
    overwrite: bool = False  # replace an existing run in `out` (once the new run is complete)
    lora_config: LoRAConfig = CLASSIFIER_LORA  # rank, alpha, ... (methods "lora" and "dora")
    lr: float | None = None  # None: the method's LEARNING_RATES (or QUICK_LEARNING_RATES)
    loraplus_lr_ratio: float | None = None  # LoRA+: B learns at lr x this (lora, dora); None: plain LoRA
    batch_size: int = 8
    bucket: bool = False  # batches of similar-length messages (less padding, faster epochs)
    seed: int = 123
    device: str | None = None  # None: CUDA, then MPS, then CPU
    precision: str = "fp32"  # "bf16" or "fp16": forward passes in 16 bits (llm_scratch.precision)
    quick: bool | None = None  # tiny model, shipped data, no network; None: follow LLM_SCRATCH_QUICK
    data_path: Path | None = None  # a local SMSSpamCollection file or UCI zip instead of the download
    weights_path: Path | None = None  # a local GPT-2 model.safetensors instead of the download
    random_init: bool = False  # start from random weights instead of pretrained GPT-2
    eval_every: int = 50  # steps between validation-loss checks
    progress: bool = True  # progress bars

    @classmethod
    def from_options(cls, rank: int | None = None, alpha: float | None = None, **fields) -> FinetuneSettings:
        """Settings from flat options, as the command line gives them: `rank` and `alpha` go into the
        LoRAConfig; an option left out keeps its default."""
        lora = {name: value for name, value in (("rank", rank), ("alpha", alpha)) if value is not None}
        return cls(**fields, lora_config=dataclasses.replace(CLASSIFIER_LORA, **lora))

    def __post_init__(self) -> None:
        """Refuse, with the option's name, every value a run could not honour."""
        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.model_name is not None and self.model_name not in PRESETS:
            raise ValueError(f"unknown --model-name {self.model_name!r}; choose one of {', '.join(PRESETS)}")
        if self.epochs is not None and not (whole(self.epochs) and self.epochs >= 1):
            raise ValueError(f"--epochs must be a whole number >= 1, got {self.epochs!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"--lr must be a number > 0 (0 would train nothing), got {self.lr!r}; "
                             "leave it out for the method's default")
        for name in ("batch_size", "eval_every"):
            if not (whole(getattr(self, name)) and getattr(self, name) >= 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= 1, "
                                 f"got {getattr(self, name)!r}")
        if not (whole(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"--seed must be a whole number from 0 to {MAX_SEED:,} (PyTorch's limit), "
                             f"got {self.seed!r}")
        if self.device is not None and not (isinstance(self.device, str)
                                            and DEVICE_NAME.fullmatch(self.device)):
            raise ValueError(f"--device must be cpu, cuda, cuda:N (the N-th GPU) or mps, got {self.device!r}")
        check_precision(self.precision)
        if self.weights_path is not None and self.random_init:
            raise ValueError("--weights-path and --random-init contradict each other: pretrained weights "
                             "from a file, or random ones? Drop one of them")


def write_quick_base_model(path: Path, seed: int) -> Path:
    """Quick mode's "pretrained" model: the tiny preset with random weights, in GPT-2's file layout, so it
    is read back through the same loader as the real weights."""
    torch.manual_seed(seed)
    return save_gpt2_safetensors(GPTModel(GPTConfig.from_preset(QUICK_MODEL_NAME)), path)


def _base_source(settings: FinetuneSettings, quick: bool, model_name: str, folder: Path) -> dict:
    """Where the base model's weights come from, with their SHA-256 and size, recorded in run.json so that
    `classify` rebuilds the very same model. Quick mode writes its base model into the run's `folder`."""
    if quick:
        path = write_quick_base_model(folder / QUICK_BASE_FILE, settings.seed)
        return {"kind": "file", "model_name": model_name, "path": path.name,
                "note": "quick mode: tiny random model", **fingerprint(path)}
    if settings.random_init:
        return {"kind": "random", "model_name": model_name, "seed": settings.seed,
                "note": "random init, no pretrained weights"}
    if settings.weights_path is not None:
        path = Path(settings.weights_path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path} (--weights-path); check the path")
        return {"kind": "file", "model_name": model_name, "path": str(path), "note": "pretrained",
                **fingerprint(path)}
    return {"kind": "hub", "model_name": model_name, "note": "pretrained",
            **fingerprint(download_gpt2(model_name))}


def _setting(run: dict) -> str:
    """What a run trained on, for figure titles: e.g. "gpt2-small, SMS Spam Collection (pretrained)"."""
    return f"{run['model_name']}, {run['data']} ({run['base']['note']})"


def finetune(settings: FinetuneSettings) -> dict:
    """Fine-tune one method end to end; write run.json, metrics.json, figures and the trained tensors.

    Returns the metrics (also written to metrics.json), e.g. `finetune(FinetuneSettings(quick=True))`.
    """
    method, loraplus = settings.method, settings.loraplus_lr_ratio
    if method in LORA_METHODS and "out_head" not in settings.lora_config.modules_to_save:
        raise ValueError("the classifier's new head must train with LoRA: add 'out_head' to the LoRAConfig's "
                         "modules_to_save (the default CLASSIFIER_LORA has it)")
    if loraplus is not None and method not in LORA_METHODS:
        raise ValueError(f"LoRA+ (loraplus_lr_ratio={loraplus}) sets the learning rate of LoRA's B matrices; "
                         f"use it with method lora or dora, not {method!r}")
    quick = quick_mode(settings.quick)
    model_name = _model_name(settings, quick)
    device = _device(settings.device)
    check_precision(settings.precision, device)  # before anything is written
    out = Path(settings.out) if settings.out is not None else Path("runs") / settings.method
    with writing_run(out, settings.overwrite) as folder:  # `out` changes only if the run completes
        metrics = _train_into(folder, settings, quick, model_name, device)
    accuracies = ", ".join(
        f"{name} {format_accuracy(metrics[f'{name}_accuracy'], metrics[f'{name}_examples'])}"
        for name in ("train", "validation", "test"))
    print(f"{settings.method} accuracy: {accuracies}; trained in {metrics['train_time_s']:.1f} s; wrote "
          f"{out}/{{{RUN_FILE}, {METRICS_FILE}, loss.png, accuracy.png, {metrics['saved_file']}}}")
    return metrics


def _model_name(settings: FinetuneSettings, quick: bool) -> str:
    """The base model's name; quick mode refuses the options it cannot honour (it trains a tiny model)."""
    if quick and settings.weights_path is not None:
        raise ValueError("--weights-path cannot be used in quick mode (--quick or LLM_SCRATCH_QUICK=1), "
                         "which always starts from a tiny random model; drop one of them")
    if quick and settings.model_name not in (None, QUICK_MODEL_NAME):
        raise ValueError(f"quick mode always trains the {QUICK_MODEL_NAME!r} model, not --model-name "
                         f"{settings.model_name}; drop one of them")
    if quick:
        return QUICK_MODEL_NAME
    return DEFAULT_MODEL_NAME if settings.model_name is None else settings.model_name


def _device(name: str | None) -> torch.device:
    """The device to train on; a clear error for one this machine lacks (e.g. cuda:3 on a one-GPU machine)."""
    device = pick_device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"--device {name} asks for GPU number {device.index}, but this machine has "
                           f"{torch.cuda.device_count()} (numbered from 0)")
    return device


def _train_into(folder: Path, settings: FinetuneSettings, quick: bool, model_name: str,
                device: torch.device) -> dict:
    """The run itself: train, then write every file of the run into `folder` (a new, empty folder)."""
    method, loraplus = settings.method, settings.loraplus_lr_ratio
    lora_config = method_lora_config(method, settings.lora_config) if method in LORA_METHODS else None
    epochs = settings.epochs if settings.epochs is not None else (QUICK_EPOCHS if quick else EPOCHS)
    if settings.lr is not None:
        lr = settings.lr
    else:
        lr = (QUICK_LEARNING_RATES if quick else LEARNING_RATES)[method]

    splits = load_spam_splits(data_path=settings.data_path, quick=quick, seed=settings.seed)
    source = _base_source(settings, quick, model_name, folder)
    model = load_base(source, folder, device)
    add_classification_head(model, num_classes=len(LABELS), seed=settings.seed)
    prepare_for_method(model, method, settings.lora_config, seed=settings.seed)
    groups = None if loraplus is None else loraplus_param_groups(model, lr, loraplus)  # checks the ratio
    summary = parameter_summary(model, verbose=False)
    print(f"{method}: {summary}  |  device {device}  |  {source['note']}")
    loaders = spam_dataloaders(splits, batch_size=settings.batch_size,
                               context_length=model.cfg.context_length, bucket=settings.bucket,
                               seed=settings.seed)
    # Last-block: the frozen embeddings and blocks run once per message; the rest of the model trains on that.
    prefix = skip_frozen_prefix(model, loaders, settings.progress)  # else: the model and loaders
    trained, loaders = prefix.model, prefix.loaders
    history = train_classifier(trained, loaders.train, loaders.validation, epochs=epochs, lr=lr,
                               eval_every=settings.eval_every, seed=settings.seed, device=device,
                               progress=settings.progress, param_groups=groups, precision=settings.precision)
    accuracies = {}  # each split's accuracy, its number of messages and its 95% interval
    for name, loader in zip(("train", "validation", "test"), loaders[:3], strict=True):
        with autocast(settings.precision, device):
            accuracy, total = evaluate(trained, loader)["accuracy"], len(loader.dataset)
        interval = wilson_interval(round(accuracy * total), total)
        accuracies.update({f"{name}_accuracy": accuracy, f"{name}_examples": total,
                           f"{name}_accuracy_interval": list(interval)})

    data = "SMS Spam Collection subset" if quick and settings.data_path is None else "SMS Spam Collection"
    run = {"method": method, "model_name": source["model_name"], "quick": quick, "data": data, "base": source,
           "seed": settings.seed, "labels": list(LABELS), "max_length": loaders.max_length,
           "lora_config": dataclasses.asdict(lora_config) if lora_config else None,
           "loraplus_lr_ratio": loraplus}
    saved = _save_trained(model, method, lora_config, model_name, folder)
    run["trained"] = fingerprint(saved)
    (folder / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")

    metrics = {
        **run, **accuracies, "epochs": epochs, "lr": lr, "batch_size": settings.batch_size,
        "bucket": settings.bucket, "device": str(device), "precision": settings.precision,
        "trainable_parameters": summary.trainable, "total_parameters": summary.base,
        "train_time_s": history.wall_time_s + prefix.seconds, "peak_memory_mb": history.peak_memory_mb,
        "peak_memory_kind": history.peak_memory_kind, "saved_file": saved.name,
        "saved_file_mb": saved.stat().st_size / 2**20, "history": history.to_dict(),
    }
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    save_figure(plot_losses(history, f"{method} loss: {_setting(run)}"), "loss.png", folder)
    save_figure(plot_accuracy(history, f"{method} accuracy: {_setting(run)}"), "accuracy.png", folder)
    plt.close("all")  # the figures are in files; a long compare would otherwise keep them all open
    return metrics


def _save_trained(model: GPTModel, method: str, lora_config: LoRAConfig | None, model_name: str,
                  folder: Path) -> Path:
    """Write the tensors training changed into `folder`: the adapter (lora, dora), else every one (full)
    or the last block, final norm and head (last-block). A NaN or an infinity in them is refused."""
    trained = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    for name, tensor in trained.items():
        require_finite(tensor, name, "the trained model", advice=f"nothing was saved. {NON_FINITE_CAUSES}")
    if method in LORA_METHODS:
        return save_lora(model, folder / ADAPTER_FILE, lora_config, model_name=model_name)
    return save_safetensors(trained, folder / WEIGHTS_FILE,
                            metadata={"method": method, "model_name": model_name})


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
        f"| {m} | {r['trainable_parameters']:,} of {r['total_parameters']:,} | "
        f"{format_accuracy(r['test_accuracy'], r['test_examples'])} | "
        f"{format_accuracy(r['validation_accuracy'], r['validation_examples'])} | "
        f"{r['train_time_s']:.0f} s | {r['peak_memory_mb']:,.0f} MB | {r['saved_file_mb']:,.1f} MB |\n"
        for m, r in results.items())
    note = (f"\n{setting}; {first['epochs']} epochs, batch {first['batch_size']}, seed {first['seed']}, "
            f"device {first['device']}; peak memory is the {first['peak_memory_kind']}. Accuracies on "
            f"{first['test_examples']:,} test and {first['validation_examples']:,} validation messages, with "
            "their 95% Wilson interval.\n")
    if ratio is not None:
        note += f"LoRA+ on the LoRA methods: B's learning rate is {ratio:g} times A's.\n"
    if command:
        note += f"Command: `{command}`\n"
    with atomic_path(out / "comparison.md") as temporary:
        temporary.write_text(header + rows + note)
    save_figure(plot_comparison(results, f"Methods compared ({setting})"), "comparison.png", out)
    plt.close("all")
    print(header + rows + note)
    return results


def load_run(run_dir: Path, device: str | None = None) -> tuple[GPTModel, dict]:
    """The fine-tuned classifier saved in `run_dir` by `finetune`, in eval mode, and its run settings.

    Refuses (ValueError) a run.json with a missing or wrong key, a base weights file or trained tensors
    whose SHA-256 or size differ from those recorded, and tensors with NaN or infinity."""
    run_dir = Path(run_dir)
    run = read_run(run_dir, METHODS)
    model = load_base(run["base"], run_dir, pick_device(device))
    add_classification_head(model, num_classes=len(run["labels"]))
    trained_path = run_dir / (ADAPTER_FILE if run["method"] in LORA_METHODS else WEIGHTS_FILE)
    check_fingerprint(trained_path, run["trained"], "the trained tensors")
    if run["method"] in LORA_METHODS:
        load_lora(model, trained_path, model_name=run["model_name"])
    else:  # exactly the tensors the method trains: all of them, or the last block, final norm and head
        load_trained_weights(model, trained_path, prepare_for_method(model, run["method"]))
    return model.eval(), run


def classify_with_run(run_dir: Path, texts: list[str], device: str | None = None) -> list[tuple[str, float]]:
    """Classify `texts` with the run saved in `run_dir`: (label, probability) of each, in order."""
    model, run = load_run(run_dir, device)
    labels = tuple(run["labels"])
    return [classify(text, model, labels=labels, max_length=run["max_length"]) for text in texts]
