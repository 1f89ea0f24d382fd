"""A pretraining run end to end: its settings and `pretrain`, which trains a GPT from random weights on a
text (by default the short story that ships with the package) and writes the model in GPT-2's file layout,
its metrics, the loss figure and the samples. The CLI and the notebooks call this module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

from llm_scratch.config import GPTConfig, pick_device, quick_mode
from llm_scratch.data import TEXT_RESOURCE, load_text, text_dataloaders
from llm_scratch.files import atomic_path
from llm_scratch.language_model import complete_text, evaluate, train_language_model
from llm_scratch.model import GPTModel, count_parameters
from llm_scratch.plots import plot_losses, save_figure
from llm_scratch.precision import autocast, check_precision
from llm_scratch.pretrained import WEIGHTS_FILE, save_gpt2_safetensors

# Full mode's defaults: windows of 256 tokens, 2 per step (the story makes 18 training windows, 9 steps an
# epoch), a validation check every 5 steps. Quick mode trains the tiny preset on windows of 64 tokens: the
# same tokens per epoch in 4 times as many, cheaper steps, which teach a tiny model more in a few seconds.
EPOCHS, QUICK_EPOCHS = 10, 10
CONTEXT_LENGTH, QUICK_CONTEXT_LENGTH = 256, 64
EVAL_EVERY, QUICK_EVAL_EVERY = 5, 20
QUICK_MODEL_NAME = "tiny"
# AdamW learning rates. A GPT-2 shape trains stably at 4e-4 from random weights; the tiny model is 12 times
# narrower and takes larger steps (at 4e-4 it learns several times more slowly).
LEARNING_RATES = {"tiny": 3e-3}
DEFAULT_LEARNING_RATE = 4e-4
WEIGHT_DECAY = 0.1  # AdamW's pull of every weight towards 0
DROP_RATE = 0.1  # dropout while pretraining, as GPT-2 was trained (the saved model computes without it)
SAMPLE_TOKENS = 30  # tokens generated after every epoch
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.txt"
LOSS_FIGURE = "loss.png"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything one pretraining run depends on; the CLI has one option per field (`--model-name`, ...)."""

    data_path: Path | None = None  # a UTF-8 text file; None: the story that ships with the package
    model_name: str = "tiny"  # the preset to train from random weights: tiny, gpt2-small, ...
    epochs: int | None = None  # None: EPOCHS, or QUICK_EPOCHS in quick mode
    context_length: int | None = None  # tokens per window; None: CONTEXT_LENGTH (QUICK_... in quick mode)
    stride: int | None = None  # tokens between window starts; None: context_length (no overlap)
    batch_size: int = 2  # windows per step
    lr: float | None = None  # None: LEARNING_RATES[model_name], else DEFAULT_LEARNING_RATE
    seed: int = 123
    device: str | None = None  # None: CUDA, then MPS, then CPU
    precision: str = "fp32"  # "bf16" or "fp16": forward passes in 16 bits (llm_scratch.precision)
    out: Path | None = None  # the run folder; None: runs/pretrain
    quick: bool | None = None  # the tiny model and the QUICK_ defaults; None: follow LLM_SCRATCH_QUICK
    eval_every: int | None = None  # steps between validation-loss checks; None: EVAL_EVERY (QUICK_...)
    sample_prompt: str = "I had always thought"  # continued after every epoch, to watch the model learn
    progress: bool = True  # progress bars


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
    quick = quick_mode(settings.quick)
    if quick and settings.model_name != QUICK_MODEL_NAME:
        raise ValueError(f"quick mode trains the {QUICK_MODEL_NAME!r} preset, but model_name is "
                         f"{settings.model_name!r}; leave out --quick (and LLM_SCRATCH_QUICK) to train it")
    out = Path(settings.out) if settings.out is not None else Path("runs") / "pretrain"
    device = pick_device(settings.device)
    check_precision(settings.precision, device)
    epochs = _given_or(settings.epochs, QUICK_EPOCHS if quick else EPOCHS)
    context_length = _given_or(settings.context_length, QUICK_CONTEXT_LENGTH if quick else CONTEXT_LENGTH)
    eval_every = _given_or(settings.eval_every, QUICK_EVAL_EVERY if quick else EVAL_EVERY)
    lr = _given_or(settings.lr, LEARNING_RATES.get(settings.model_name, DEFAULT_LEARNING_RATE))
    model = build_model(settings.model_name, context_length, settings.seed)
    loaders = text_dataloaders(load_text(settings.data_path), context_length, settings.stride,
                               settings.batch_size, settings.seed)
    data = TEXT_RESOURCE if settings.data_path is None else str(settings.data_path)
    n_params = count_parameters(model)
    print(f"pretraining {settings.model_name} ({n_params:,} parameters) on {data}: "
          f"{len(loaders.train.dataset)} training and {len(loaders.validation.dataset)} validation windows "
          f"of {context_length} tokens | device {device}")

    samples: list[str] = []

    def print_sample(epoch: int, trained: nn.Module) -> None:
        sample = complete_text(trained, settings.sample_prompt, SAMPLE_TOKENS, context_size=context_length)
        samples.append(sample)
        print(f"epoch {epoch} sample: {samples[-1]!r}")

    history = train_language_model(model, loaders.train, loaders.validation, epochs=epochs, lr=lr,
                                   weight_decay=WEIGHT_DECAY, eval_every=eval_every,
                                   seed=settings.seed, device=device, progress=settings.progress,
                                   on_epoch_end=print_sample, precision=settings.precision)
    with autocast(settings.precision, device):
        final = {f"{name}_{key}": value for name, loader in zip(("train", "validation"), loaders, strict=True)
                 for key, value in evaluate(model, loader).items()}

    # metrics.json marks a complete run: an earlier run's goes before its other files are replaced, ours
    # comes last.
    (out / METRICS_FILE).unlink(missing_ok=True)
    save_gpt2_safetensors(model, out / WEIGHTS_FILE, hf_config=True)
    title = f"Pretraining {settings.model_name} on {Path(data).name}" + (" (quick mode)" if quick else "")
    save_figure(plot_losses(history, title, seen=True), LOSS_FIGURE, out)
    plt.close("all")
    with atomic_path(out / SAMPLES_FILE) as temporary:
        temporary.write_text("".join(f"epoch {i}: {s}\n\n" for i, s in enumerate(samples, start=1)))
    metrics = {
        "model_name": settings.model_name, "quick": quick, "data": data, "parameters": n_params,
        **final, "tokens_seen": history.step_seen[-1], "epochs": epochs, "lr": lr,
        "context_length": context_length, "eval_every": eval_every,
        "settings": {k: str(v) if isinstance(v, Path) else v
                     for k, v in dataclasses.asdict(settings).items()},
        "device": str(device), "train_time_s": history.wall_time_s, "peak_memory_mb": history.peak_memory_mb,
        "peak_memory_kind": history.peak_memory_kind, "samples": samples, "history": history.to_dict(),
    }
    with atomic_path(out / METRICS_FILE) as temporary:
        temporary.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"train loss {final['train_loss']:.3f} (perplexity {final['train_perplexity']:.1f}), validation "
          f"loss {final['validation_loss']:.3f} (perplexity {final['validation_perplexity']:.1f}) after "
          f"{history.step_seen[-1]:,} tokens in {history.wall_time_s:.1f} s; wrote "
          f"{out}/{{{WEIGHTS_FILE}, config.json, {LOSS_FIGURE}, {SAMPLES_FILE}, {METRICS_FILE}}}")
    return metrics
