"""One training loop for any model and any loss (fine-tuning a classifier, pretraining a language model).

The loop knows nothing of what it trains: the caller passes the loss, `loss_fn(model, batch) -> loss`, and
optionally `evaluate_fn(model, loader, max_batches) -> {"loss": ..., other metrics}`. It can warm the learning
rate up and let it decay along a cosine, clip the gradients' norm, and save a checkpoint after every epoch
that `resume_from` continues with the very losses an uninterrupted run would have had.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from llm_scratch.config import pick_device
from llm_scratch.files import atomic_path
from llm_scratch.model import eval_mode
from llm_scratch.optimizer import LR_SCHEDULES, adamw, lr_factor
from llm_scratch.precision import autocast, check_precision, grad_scaler

# What usually makes a loss NaN or infinite, for the error that stops training.
NON_FINITE_CAUSES = ("Likely causes: a learning rate too large (try one 10 times smaller), NaN or infinity "
                     "in the starting weights, half-precision (float16) weights or computation, or a LoRA "
                     "alpha too large.")
LossFn = Callable[[nn.Module, object], torch.Tensor]  # (model, batch) -> the batch's mean loss
EvaluateFn = Callable[[nn.Module, DataLoader, "int | None"], dict[str, float]]


@dataclass
class History:
    """What happened during training, for plots and for `metrics.json`."""

    unit: str = "examples"  # what `seen` counts: "examples" (messages) or "tokens"
    step_loss: list[float] = field(default_factory=list)  # training loss of every step
    step_lr: list[float] = field(default_factory=list)  # learning rate of every step (the first group's)
    step_seen: list[int] = field(default_factory=list)  # examples (or tokens) seen after every step
    eval_seen: list[int] = field(default_factory=list)  # examples (or tokens) seen at each evaluation
    eval_train_loss: list[float] = field(default_factory=list)  # loss on a few training batches
    eval_val_loss: list[float] = field(default_factory=list)  # loss on a few validation batches
    # After each epoch, every metric of `evaluate_fn` on a few training batches ("train_loss",
    # "train_accuracy", ...) and on the whole validation set ("validation_loss", ...).
    epoch_metrics: dict[str, list[float]] = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""  # what `peak_memory_mb` measured on this device
    device: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class PeakMemory:
    """Peak memory while the `with` block runs: CUDA allocations on a GPU, else the process's RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "CUDA max allocated"
        else:
            self.kind = "process peak RSS"
            self._stop = threading.Event()
            self._peak = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:  # RSS every 20 ms, since a process's lifetime peak cannot be reset
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, _rss_mb())


def _rss_mb() -> float:
    """Resident memory of this process in MB (Linux: now; elsewhere: the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, kB on Linux
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@torch.no_grad()
def mean_loss(model: nn.Module, loader, loss_fn: LossFn, max_batches: int | None = None) -> dict[str, float]:
    """{"loss": mean of `loss_fn` over `loader`'s first `max_batches` batches (all if None)}, eval mode."""
    losses = []
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            losses.append(loss_fn(model, batch).item())
    if not losses:
        raise ValueError("cannot evaluate on an empty data loader")
    return {"loss": sum(losses) / len(losses)}


# ---- The loop ----

@dataclass(frozen=True)
class TrainOptions:
    """How `train` steps: the schedule, clipping, evaluation and checkpoints (see `train`'s arguments)."""

    epochs: int = 5
    eval_every: int = 50
    eval_batches: int = 5
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = None
    precision: str = "fp32"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.eval_every < 1 or self.eval_batches < 1:
            raise ValueError(f"eval_every and eval_batches must be >= 1, got {self.eval_every} and "
                             f"{self.eval_batches}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"warmup_steps must be >= 0 and min_lr_ratio in [0, 1], got {self.warmup_steps} "
                             f"and {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None: no clipping), got {self.max_grad_norm}")


def train(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    loss_fn: LossFn,
    *,
    evaluate_fn: EvaluateFn | None = None,
    count_fn: Callable[[object], int] = len,
    unit: str = "examples",
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    seed: int = 123,
    device: str | torch.device | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    param_groups: list[dict] | None = None,
    checkpoint_path: str | Path | None = None,
    resume_from: str | Path | None = None,
    **options,
) -> History:
    """Train every parameter with `requires_grad` by AdamW on `loss_fn`; return the History.

    `evaluate_fn` (default: the mean of `loss_fn`) measures a loader; `count_fn(batch)` says how many `unit`s
    a batch holds. `options` are `TrainOptions`: `epochs`; every `eval_every` steps the loss on
    `eval_batches` training and validation batches is recorded, and after each epoch every metric on
    `eval_batches` training batches and on the whole validation set, then `on_epoch_end(epoch, model)` runs;
    `warmup_steps`, `lr_schedule` ("constant" or "cosine", down to `min_lr_ratio` of `lr`), `max_grad_norm`
    (clip the gradients' norm), `precision` ("bf16", "fp16": forward passes in 16 bits), `progress`.
    AdamW exempts biases and norms from `weight_decay` (`no_weight_decay`); `param_groups`: groups with their
    own learning rates (e.g. LoRA+'s) holding every trainable parameter once. `checkpoint_path`: save a
    checkpoint after every epoch; `resume_from`: continue from one, with the losses an unbroken run has.
    """
    opts = TrainOptions(**options)
    device = device if isinstance(device, torch.device) else pick_device(device)
    check_precision(opts.precision, device)
    torch.manual_seed(seed)
    model.to(device)
    optimizer = adamw(model, lr, weight_decay, param_groups)
    total_steps = opts.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps, opts.warmup_steps, opts.lr_schedule, opts.min_lr_ratio))
    run = _Run(model, optimizer, scheduler, grad_scaler(opts.precision, device), loss_fn,
               evaluate_fn or (lambda m, loader, n: mean_loss(m, loader, loss_fn, n)), count_fn, opts, device,
               History(unit=unit, device=str(device)), train_loader, val_loader)
    first_epoch = 1 if resume_from is None else run.load_checkpoint(resume_from) + 1
    start = time.perf_counter() - run.history.wall_time_s
    with PeakMemory(device) as memory:
        for epoch in range(first_epoch, opts.epochs + 1):
            run.epoch(epoch)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
            run.history.wall_time_s = time.perf_counter() - start
            if checkpoint_path is not None:
                run.save_checkpoint(checkpoint_path, epoch)
    run.history.peak_memory_mb = max(memory.peak_mb, run.history.peak_memory_mb)
    run.history.peak_memory_kind = memory.kind
    return run.history


class _Run:
    """The state of one `train` call: the model, AdamW and its schedule, the History, the loaders."""

    def __init__(self, model, optimizer, scheduler, scaler, loss_fn, evaluate_fn, count_fn, opts, device,
                 history, train_loader, val_loader) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.loss_fn, self.evaluate_fn, self.count_fn = loss_fn, evaluate_fn, count_fn
        self.opts, self.device, self.history = opts, device, history
        self.train_loader, self.val_loader = train_loader, val_loader
        # Loss and metrics on the training set are estimated on its first `eval_batches` batches, read in a
        # fixed order: iterating the shuffled loader for that would change the order training sees.
        self.train_sample = DataLoader(train_loader.dataset, batch_size=train_loader.batch_size or 8,
                                       collate_fn=train_loader.collate_fn)
        self.seen = self.step = 0

    def measure(self, loader: DataLoader, max_batches: int | None) -> dict[str, float]:
        with autocast(self.opts.precision, self.device):
            return self.evaluate_fn(self.model, loader, max_batches)

    def epoch(self, epoch: int) -> None:
        """One pass over the training loader, then the end-of-epoch metrics."""
        self.model.train()
        # One iterator per epoch, made here: given the loader itself, tqdm.auto would make a spare one, which
        # draws a seed from the loader's generator and so changes the order of the batches.
        opts, history = self.opts, self.history
        bar = tqdm(iter(self.train_loader), total=len(self.train_loader), desc=f"epoch {epoch}/{opts.epochs}",
                   disable=not opts.progress, leave=False)
        for batch in bar:
            self.train_step(batch, epoch)
            bar.set_postfix(loss=f"{history.step_loss[-1]:.3f}")
            if self.step % opts.eval_every == 0:
                history.eval_seen.append(self.seen)
                history.eval_train_loss.append(self.measure(self.train_sample, opts.eval_batches)["loss"])
                history.eval_val_loss.append(self.measure(self.val_loader, opts.eval_batches)["loss"])
        measured = {f"train_{k}": v for k, v in self.measure(self.train_sample, opts.eval_batches).items()}
        measured.update({f"validation_{k}": v for k, v in self.measure(self.val_loader, None).items()})
        for name, value in measured.items():
            history.epoch_metrics.setdefault(name, []).append(value)
        if opts.progress:
            tqdm.write(f"epoch {epoch}: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}"
                                                      for k, v in measured.items()))

    def train_step(self, batch, epoch: int) -> None:
        """Forward, backward, clipping (if set), the AdamW step and the schedule's; records the loss, the
        learning rate and the count."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.opts.precision, self.device):  # the forward pass; backward follows its types
            loss = self.loss_fn(self.model, batch)
        value = loss.item()
        if not math.isfinite(value):  # stop at once: every later step would be garbage
            raise RuntimeError(f"the training loss is {value} at step {self.step + 1} (epoch {epoch}); "
                               f"training stopped. {NON_FINITE_CAUSES}")
        self.scaler.scale(loss).backward()  # without fp16: loss.backward()
        if self.opts.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # fp16: clip the true gradients, not the scaled ones
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.opts.max_grad_norm)
        self.history.step_lr.append(self.optimizer.param_groups[0]["lr"])
        self.scaler.step(self.optimizer)  # without fp16: optimizer.step()
        self.scaler.update()
        self.scheduler.step()
        self.seen += self.count_fn(batch)
        self.step += 1
        self.history.step_loss.append(value)
        self.history.step_seen.append(self.seen)

    def save_checkpoint(self, path: str | Path, epoch: int) -> None:
        """Everything the next epochs depend on: weights, AdamW's state and schedule, the random generators
        (dropout, the order of the batches), the History. Written all or nothing."""
        state = {"epoch": epoch, "step": self.step, "seen": self.seen, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                 "loader_rng": [g.get_state() for g in _generators(self.train_loader)],
                 "history": self.history.to_dict()}
        with atomic_path(path) as temporary:
            torch.save(state, temporary)

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore what `save_checkpoint` saved; return the epoch it was saved after."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {path}; pass the checkpoint_path of an earlier run")
        state = torch.load(path, map_location=self.device, weights_only=True)
        generators = _generators(self.train_loader)
        if len(generators) != len(state["loader_rng"]) or state["epoch"] >= self.opts.epochs:
            raise ValueError(f"{path} was saved after epoch {state['epoch']} of another run (or after this "
                             f"run's last epoch, {self.opts.epochs}); resume with the same loaders and more "
                             "epochs")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # The generators' states are CPU byte tensors, wherever map_location put the rest.
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and self.device.type == "cuda":  # dropout's generator on a GPU
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        for generator, saved in zip(generators, state["loader_rng"], strict=True):
            generator.set_state(saved.cpu())
        self.step, self.seen = state["step"], state["seen"]
        self.history = History(**state["history"])
        return state["epoch"]


def _generators(loader: DataLoader) -> list[torch.Generator]:
    """The random generators that decide the order of `loader`'s batches (its own, its samplers')."""
    found = [loader.generator, getattr(loader.sampler, "generator", None),
             getattr(loader.batch_sampler, "generator", None)]
    unique = []
    for generator in found:
        if generator is not None and all(generator is not seen for seen in unique):
            unique.append(generator)
    return unique
