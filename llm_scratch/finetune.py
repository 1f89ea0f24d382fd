"""A fine-tuning run end to end: its settings, `finetune` and `load_run` (`llm_scratch.compare` runs several).

The CLI and the notebooks call this module; it knows nothing of the command line. Its run folders go
through the run layer (`llm_scratch.run_record`): staged, locked, recorded, refused when they would mix runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import matplotlib.pyplot as plt
import torch

from llm_scratch.classifier import (
    add_classification_head,
    classify,
    evaluate_classifier,
    format_accuracy,
    train_classifier,
    wilson_interval,
)
from llm_scratch.config import pick_device
from llm_scratch.data import LABELS, load_spam_splits, spam_dataloaders
from llm_scratch.frozen_prefix import skip_frozen_prefix
from llm_scratch.lora import LoRAConfig, parameter_summary
from llm_scratch.loraplus import loraplus_param_groups
from llm_scratch.methods import (
    CLASSIFIER_LORA,
    LEARNING_RATES,
    METHODS,
    QUICK_LEARNING_RATES,
    prepare_for_method,
)
from llm_scratch.model import GPTModel
from llm_scratch.plots import plot_accuracy, plot_losses, save_figure
from llm_scratch.precision import autocast, check_precision
from llm_scratch.run_folder import fingerprint
from llm_scratch.run_record import (
    ACCURACY_FIGURE,
    LOSS_FIGURE,
    METRICS_FILE,
    RunRecord,
    load_base,
    read_record,
    record_path,
    write_json,
    write_record,
    writing_run_folder,
)
from llm_scratch.run_settings import RunSettings, base_model, load_trained, save_trained

COMMAND = "finetune"
EPOCHS, QUICK_EPOCHS = 5, 8
BATCH_SIZE = QUICK_BATCH_SIZE = 8


@dataclass(frozen=True)
class FinetuneSettings(RunSettings):
    """Everything one fine-tuning run depends on (the fields of `RunSettings`, and `bucket`); the CLI's
    options map one to one onto these fields. `data_path`: a local SMSSpamCollection file or UCI zip."""

    COMMAND: ClassVar[str] = COMMAND
    METHODS: ClassVar[tuple[str, ...]] = METHODS  # "full", "last-block", "lora" or "dora"
    EPOCHS: ClassVar[int] = EPOCHS
    QUICK_EPOCHS: ClassVar[int] = QUICK_EPOCHS
    BATCH_SIZE: ClassVar[int] = BATCH_SIZE
    QUICK_BATCH_SIZE: ClassVar[int] = QUICK_BATCH_SIZE
    LEARNING_RATES: ClassVar[dict[str, float]] = LEARNING_RATES
    QUICK_LEARNING_RATES: ClassVar[dict[str, float]] = QUICK_LEARNING_RATES
    # Quick mode's large steps on a tiny random model can undo in one late epoch what the earlier ones
    # learned. A rate that falls along a cosine to a tenth by the last step lets the run settle: over 20 seeds
    # no quick LoRA or QLoRA run ended under 78% test accuracy, against 55% at a constant rate (RESULTS.md).
    QUICK_LR_SCHEDULE: ClassVar[str] = "cosine"  # full mode keeps RunSettings' constant rate
    DEFAULT_LORA: ClassVar[LoRAConfig] = CLASSIFIER_LORA  # LoRA beside every Linear, the head trained

    bucket: bool = False  # batches of similar-length messages (less padding, faster epochs)

    def check_contradictions(self) -> None:
        super().check_contradictions()
        if self.lora_config is not None and "out_head" not in self.lora_config.modules_to_save:
            raise ValueError("the classifier's new head must train with LoRA: add 'out_head' to the "
                             "LoRAConfig's modules_to_save (the default CLASSIFIER_LORA has it)")


def finetune(settings: FinetuneSettings) -> dict:
    """Fine-tune one method end to end; write run.json, metrics.json, figures and the trained tensors.

    Returns the metrics (also written to metrics.json), e.g. `finetune(FinetuneSettings(quick=True))`.
    """
    settings = settings.resolved()
    check_precision(settings.precision, torch.device(settings.device))  # before anything is written
    with writing_run_folder(settings.out, COMMAND, settings.overwrite) as folder:  # replaces `out` at the end
        metrics = _train_into(folder, settings)
    accuracies = ", ".join(
        f"{name} {format_accuracy(metrics[f'{name}_accuracy'], metrics[f'{name}_examples'])}"
        for name in ("train", "validation", "test"))
    written = ", ".join(sorted(path.name for path in settings.out.iterdir()))
    print(f"{settings.method} accuracy: {accuracies}; trained in {metrics['train_time_s']:.1f} s; wrote "
          f"{settings.out}/{{{written}}}")
    return metrics


def _train_into(folder: Path, settings: FinetuneSettings) -> dict:
    """The run itself: train, then write every file of the run into `folder` (a new, empty folder)."""
    device = torch.device(settings.device)
    splits = load_spam_splits(data_path=settings.data_path, quick=settings.quick, seed=settings.seed)
    base = base_model(settings, folder)
    model = load_base(base, folder, device, command=COMMAND, verify=False,  # hashed just now: once is enough
                      lora_config=settings.lora_config)
    add_classification_head(model, num_classes=len(LABELS), seed=settings.seed)
    prepare_for_method(model, settings.method, settings.lora_config, seed=settings.seed)
    model.checkpointing = settings.checkpointing
    groups = None if settings.loraplus_lr_ratio is None else loraplus_param_groups(
        model, settings.lr, settings.loraplus_lr_ratio)  # checks the ratio
    summary = parameter_summary(model, verbose=False)
    print(f"{settings.method}: {summary}  |  device {device}  |  {base.note}")
    loaders = spam_dataloaders(splits, batch_size=settings.batch_size,
                               context_length=model.cfg.context_length, bucket=settings.bucket,
                               seed=settings.seed)
    # Last-block: the frozen embeddings and blocks run once per message; the rest of the model trains on that.
    prefix = skip_frozen_prefix(model, loaders, settings.progress)  # else: the model and loaders
    history = train_classifier(prefix.model, prefix.loaders.train, prefix.loaders.validation,
                               epochs=settings.epochs, lr=settings.lr, lr_schedule=settings.lr_schedule,
                               eval_every=settings.eval_every,
                               seed=settings.seed, device=device, progress=settings.progress,
                               param_groups=groups, precision=settings.precision)
    saved = save_trained(model, settings, folder)
    data = "SMS Spam Collection" + (" subset" if settings.quick and settings.data_path is None else "")
    record = RunRecord(command=COMMAND, method=settings.method, model_name=settings.model_name,
                       quick=settings.quick, data=data, base=base, settings=settings.recorded(),
                       files={saved.name: fingerprint(saved)}, lora_config=settings.lora_config,
                       labels=LABELS, max_length=loaders.max_length)
    metrics = {"command": COMMAND, "method": settings.method, "model_name": settings.model_name,
               "quick": settings.quick, "data": data, "settings": record.settings,
               **_accuracies(prefix.model, prefix.loaders, settings),
               "trainable_parameters": summary.trainable, "base_parameters": summary.base,
               "train_time_s": history.wall_time_s + prefix.seconds, "peak_memory_mb": history.peak_memory_mb,
               "peak_memory_kind": history.peak_memory_kind, "saved_file": saved.name,
               "saved_file_mb": saved.stat().st_size / 2**20, "history": history.to_dict()}
    write_json(folder / METRICS_FILE, metrics)
    save_figure(plot_losses(history, f"{settings.method} loss: {record.setting}"), LOSS_FIGURE, folder)
    save_figure(plot_accuracy(history, f"{settings.method} accuracy: {record.setting}"), ACCURACY_FIGURE,
                folder)
    plt.close("all")  # the figures are in files; a long compare would otherwise keep them all open
    write_record(folder, record)  # last: a folder with its record is a complete run
    return metrics


def _accuracies(model: torch.nn.Module, loaders, settings: FinetuneSettings) -> dict:
    """Each split's accuracy, its number of messages and its 95% Wilson interval."""
    accuracies = {}
    for name, loader in zip(("train", "validation", "test"), loaders[:3], strict=True):
        with autocast(settings.precision, torch.device(settings.device)):
            accuracy, total = evaluate_classifier(model, loader)["accuracy"], len(loader.dataset)
        interval = wilson_interval(round(accuracy * total), total)
        accuracies.update({f"{name}_accuracy": accuracy, f"{name}_examples": total,
                           f"{name}_accuracy_interval": list(interval)})
    return accuracies


def load_run(run_dir: Path, device: str | None = None) -> tuple[GPTModel, RunRecord]:
    """The fine-tuned classifier saved in `run_dir` by `finetune`, in eval mode, and its record.

    Refuses (ValueError) a run.json with a missing or wrong key, a base weights file or trained tensors
    whose SHA-256 or size differ from those recorded, and tensors with NaN or infinity."""
    run_dir = Path(run_dir)
    record = read_record(run_dir, COMMAND)
    if record.method not in METHODS or record.labels is None or record.max_length is None:
        raise ValueError(f"{record_path(run_dir)}: method {record.method!r}, labels or max_length do not "
                         f"describe a classifier of {', '.join(METHODS)}; the file was edited: run "
                         f"{COMMAND} again")
    model = load_base(record.base, run_dir, pick_device(device), command=COMMAND,
                      lora_config=record.lora_config)
    add_classification_head(model, num_classes=len(record.labels))
    load_trained(model, record, run_dir)
    return model.eval(), record


def classify_with_run(run_dir: Path, texts: list[str], device: str | None = None) -> list[tuple[str, float]]:
    """Classify `texts` with the run saved in `run_dir`: (label, probability) of each, in order."""
    model, record = load_run(run_dir, device)
    return [classify(text, model, labels=record.labels, max_length=record.max_length) for text in texts]
