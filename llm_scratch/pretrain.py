"""A pretraining run end to end: its settings and `pretrain`, which trains a GPT from random weights on a
text (by default the short story that ships with the package) and writes the model in GPT-2's file layout,
its metrics, the loss figure and the samples. Its run folder goes through the run layer
(`llm_scratch.run_record`): staged, locked, recorded, refused when it would mix runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

from llm_scratch.config import PRESETS, QUICK_PRESET, GPTConfig, pick_device, quick_mode
from llm_scratch.data import TEXT_RESOURCE, load_text, text_dataloaders
from llm_scratch.files import atomic_path
from llm_scratch.language_model import complete_text, evaluate_language_model, train_language_model
from llm_scratch.model import GPTModel, count_parameters
from llm_scratch.plots import plot_losses, save_figure
from llm_scratch.precision import autocast, check_precision
from llm_scratch.pretrained import HF_CONFIG_FILE, HF_WEIGHTS_FILE, save_gpt2_safetensors
from llm_scratch.run_folder import fingerprint
from llm_scratch.run_record import (
    LOSS_FIGURE,
    METRICS_FILE,
    SAMPLES_FILE,
    BaseModel,
    RunRecord,
    write_json,
    write_record,
    writing_run_folder,
)

COMMAND = "pretrain"
# Full mode's defaults: windows of 256 tokens, 2 per step (the story makes 18 training windows, 9 steps an
# epoch), a validation check every 5 steps. Quick mode trains the tiny preset on windows of 64 tokens: the
# same tokens per epoch in 4 times as many, cheaper steps, which teach a tiny model more in a few seconds.
EPOCHS, QUICK_EPOCHS = 10, 10
BATCH_SIZE = QUICK_BATCH_SIZE = 2  # windows per step
CONTEXT_LENGTH, QUICK_CONTEXT_LENGTH = 256, 64
EVAL_EVERY, QUICK_EVAL_EVERY = 5, 20
# AdamW learning rates by preset. A GPT-2 shape trains stably at 4e-4 from random weights; the tiny model is
# 12 times narrower and takes larger steps (at 4e-4 it learns several times more slowly).
PRETRAIN_LEARNING_RATES = {name: 3e-3 if name == QUICK_PRESET else 4e-4 for name in PRESETS}
WEIGHT_DECAY = 0.1  # AdamW's pull of the weights towards 0 (biases and norms exempt)
DROP_RATE = 0.1  # dropout while pretraining, as GPT-2 was trained (the saved model computes without it)
SAMPLE_TOKENS = 30  # tokens generated after every epoch


@dataclass(frozen=True)
class PretrainSettings:
    """Everything one pretraining run depends on; the CLI has one option per field (`--model-name`, ...).

    None means "the default for this run" (quick mode, the model): `resolved()` fills every one in.
    """

    data_path: Path | None = None  # a UTF-8 text file; None: the story that ships with the package
    model_name: str = QUICK_PRESET  # the preset to train from random weights: tiny, gpt2-small, ...
    epochs: int | None = None  # None: EPOCHS, or QUICK_EPOCHS in quick mode
    context_length: int | None = None  # tokens per window; None: CONTEXT_LENGTH (QUICK_... in quick mode)
    stride: int | None = None  # tokens between window starts; None: context_length (no overlap)
    batch_size: int = BATCH_SIZE
    lr: float | None = None  # None: PRETRAIN_LEARNING_RATES[model_name]
    seed: int = 123
    device: str | None = None  # None: CUDA, then MPS, then CPU
    precision: str = "fp32"  # "bf16" or "fp16": forward passes in 16 bits (llm_scratch.precision)
    out: Path | None = None  # the run folder; None: runs/pretrain
    overwrite: bool = False  # replace an existing pretraining run in `out` (once the new run is complete)
    quick: bool | None = None  # the tiny model and the QUICK_ defaults; None: follow LLM_SCRATCH_QUICK
    eval_every: int | None = None  # steps between validation-loss checks; None: EVAL_EVERY (QUICK_...)
    sample_prompt: str = "I had always thought"  # continued after every epoch, to watch the model learn
    progress: bool = True  # progress bars

    def resolved(self) -> PretrainSettings:
        """These settings with every default decided (what run.json records); refuses what cannot hold."""
        quick = quick_mode(self.quick)
        if quick and self.model_name != QUICK_PRESET:
            raise ValueError(f"quick mode trains the {QUICK_PRESET!r} preset, but model_name is "
                             f"{self.model_name!r}; leave out --quick (and LLM_SCRATCH_QUICK) to train it")
        if self.model_name not in PRESETS:
            raise ValueError(f"unknown --model-name {self.model_name!r}; choose one of {', '.join(PRESETS)}")
        check_precision(self.precision)
        context_length = _given_or(self.context_length, QUICK_CONTEXT_LENGTH if quick else CONTEXT_LENGTH)
        return dataclasses.replace(
            self, quick=quick, epochs=_given_or(self.epochs, QUICK_EPOCHS if quick else EPOCHS),
            context_length=context_length, stride=_given_or(self.stride, context_length),
            lr=_given_or(self.lr, PRETRAIN_LEARNING_RATES[self.model_name]),
            device=str(pick_device(self.device)), out=Path(self.out or Path("runs") / COMMAND),
            eval_every=_given_or(self.eval_every, QUICK_EVAL_EVERY if quick else EVAL_EVERY))

    def recorded(self) -> dict:
        """The settings run.json records (of resolved settings): what the run is, not where it went."""
        skipped = {"model_name", "quick", "out", "overwrite", "progress"}
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {name: str(value) if isinstance(value, Path) else value
                for name, value in values.items() if name not in skipped}


def build_model(model_name: str, context_length: int, seed: int, drop_rate: float = DROP_RATE) -> GPTModel:
    """A GPT of preset `model_name` with random weights (seeded), ready to pretrain on windows of
    `context_length` tokens."""
    cfg = GPTConfig.from_preset(model_name, drop_rate=drop_rate)
    if context_length > cfg.context_length:
        raise ValueError(f"context_length {context_length} is longer than the {model_name} model's "
                         f"{cfg.context_length} positions; use --context-length {cfg.context_length} or less")
    torch.manual_seed(seed)
    return GPTModel(cfg)


def _given_or(value, default):
    """`value` unless it is None (a setting left out), else `default`."""
    return default if value is None else value


def pretrain(settings: PretrainSettings) -> dict:
    """Pretrain a GPT from random weights on a text; write the model (model.safetensors + config.json, GPT-2's
    layout), metrics.json, loss.png and samples.txt. Returns the metrics, e.g. `pretrain(PretrainSettings())`.
    """
    settings = settings.resolved()
    check_precision(settings.precision, torch.device(settings.device))  # before anything is written
    model = build_model(settings.model_name, settings.context_length, settings.seed)  # checks the length
    with writing_run_folder(settings.out, COMMAND, settings.overwrite) as folder:  # replaces `out` at the end
        metrics = _train_into(folder, model, settings)
    print(f"train loss {metrics['train_loss']:.3f} (perplexity {metrics['train_perplexity']:.1f}), "
          f"validation loss {metrics['validation_loss']:.3f} (perplexity "
          f"{metrics['validation_perplexity']:.1f}) after {metrics['tokens_seen']:,} tokens in "
          f"{metrics['train_time_s']:.1f} s; wrote {settings.out}/"
          f"{{{', '.join(sorted(path.name for path in settings.out.iterdir()))}}}")
    return metrics


def _train_into(folder: Path, model: GPTModel, settings: PretrainSettings) -> dict:
    """The run itself: train `model`, then write every file of the run into `folder` (new and empty)."""
    device = torch.device(settings.device)
    loaders = text_dataloaders(load_text(settings.data_path), settings.context_length, settings.stride,
                               settings.batch_size, settings.seed)
    data = TEXT_RESOURCE if settings.data_path is None else str(settings.data_path)
    n_params = count_parameters(model)
    print(f"pretraining {settings.model_name} ({n_params:,} parameters) on {data}: "
          f"{len(loaders.train.dataset)} training and {len(loaders.validation.dataset)} validation windows "
          f"of {settings.context_length} tokens | device {device}")
    samples: list[str] = []

    def print_sample(epoch: int, trained: nn.Module) -> None:
        samples.append(complete_text(trained, settings.sample_prompt, SAMPLE_TOKENS,
                                     context_size=settings.context_length))
        print(f"epoch {epoch} sample: {samples[-1]!r}")

    history = train_language_model(model, loaders.train, loaders.validation, epochs=settings.epochs,
                                   lr=settings.lr, weight_decay=WEIGHT_DECAY, eval_every=settings.eval_every,
                                   seed=settings.seed, device=device, progress=settings.progress,
                                   on_epoch_end=print_sample, precision=settings.precision)
    with autocast(settings.precision, device):
        final = {f"{name}_{key}": value for name, loader in zip(("train", "validation"), loaders, strict=True)
                 for key, value in evaluate_language_model(model, loader).items()}
    weights = save_gpt2_safetensors(model, folder / HF_WEIGHTS_FILE, hf_config=True)
    quick = " (quick mode)" if settings.quick else ""
    title = f"Pretraining {settings.model_name} on {Path(data).name}{quick}"
    save_figure(plot_losses(history, title, seen=True), LOSS_FIGURE, folder)
    plt.close("all")
    with atomic_path(folder / SAMPLES_FILE) as temporary:
        temporary.write_text("".join(f"epoch {i}: {s}\n\n" for i, s in enumerate(samples, start=1)))
    base = BaseModel("random", settings.model_name, "random init", seed=settings.seed)
    record = RunRecord(command=COMMAND, method="full", model_name=settings.model_name, quick=settings.quick,
                       data=data, base=base, settings=settings.recorded(),
                       files={name: fingerprint(folder / name) for name in (weights.name, HF_CONFIG_FILE)})
    metrics = {"command": COMMAND, "model_name": settings.model_name, "quick": settings.quick, "data": data,
               "parameters": n_params, **final, "tokens_seen": history.step_seen[-1],
               "settings": record.settings, "train_time_s": history.wall_time_s,
               "peak_memory_mb": history.peak_memory_mb, "peak_memory_kind": history.peak_memory_kind,
               "samples": samples, "history": history.to_dict()}
    write_json(folder / METRICS_FILE, metrics)
    write_record(folder, record)  # last: a folder with its record is a complete run
    return metrics
