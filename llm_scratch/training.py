"""One training loop for any model and any loss (fine-tuning a classifier, pretraining a language model).

The loop knows nothing of what it trains: the caller passes the loss, `loss_fn(model, batch) -> loss`, and
optionally `evaluate_fn(model, loader, max_batches) -> {"loss": ..., other metrics}`.
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

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from llm_scratch.config import pick_device
from llm_scratch.model import eval_mode
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


def train(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    loss_fn: LossFn,
    *,
    evaluate_fn: EvaluateFn | None = None,
    count_fn: Callable[[object], int] = len,
    unit: str = "examples",
    epochs: int = 5,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    eval_every: int = 50,
    eval_batches: int = 5,
    seed: int = 123,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    param_groups: list[dict] | None = None,
    precision: str = "fp32",
) -> History:
    """Train every parameter with `requires_grad` by AdamW on `loss_fn`; return the History.

    `evaluate_fn` (default: the mean of `loss_fn`) measures a loader; `count_fn(batch)` says how many
    `unit`s a batch holds. Every `eval_every` steps the loss on `eval_batches` training and validation
    batches is recorded; after each epoch every metric on `eval_batches` training batches and on the whole
    validation set, then `on_epoch_end(epoch, model)` runs (e.g. to print a sample). `param_groups`: AdamW
    groups with their own learning rates (e.g. LoRA+'s), holding every trainable parameter once.
    `precision` "bf16" or "fp16" runs the forward passes in that type (`llm_scratch.precision`).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if eval_every < 1 or eval_batches < 1:
        raise ValueError(f"eval_every and eval_batches must be >= 1, got {eval_every} and {eval_batches}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter; choose what trains first (e.g. "
                         "llm_scratch.finetune.prepare_for_method)")
    evaluate_fn = evaluate_fn or (lambda m, loader, n: mean_loss(m, loader, loss_fn, n))
    # Loss and metrics on the training set are estimated on its first `eval_batches` batches, read in a
    # fixed order: iterating the shuffled loader for that would change the order training sees.
    train_sample = DataLoader(train_loader.dataset, batch_size=train_loader.batch_size or 8,
                              collate_fn=train_loader.collate_fn)
    device = device if isinstance(device, torch.device) else pick_device(device)
    check_precision(precision, device)
    torch.manual_seed(seed)
    model.to(device)
    # fused=True: one kernel updates every tensor, where the plain loop makes several passes over each (on a
    # CPU, a tenth of a full fine-tuning step of gpt2-small; benchmarks/RESULTS.md). The same update.
    if param_groups is None:
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=True)
    else:
        grouped = [param for group in param_groups for param in group["params"]]
        if len(grouped) != len(trainable) or {id(p) for p in grouped} != {id(p) for p in trainable}:
            raise ValueError(f"param_groups must hold every trainable parameter once and nothing else; they "
                             f"hold {len(grouped)} tensors, the model has {len(trainable)} trainable")
        # Copies of the groups: AdamW writes its defaults into the dicts it is given.
        optimizer = torch.optim.AdamW([dict(g) for g in param_groups], lr=lr, weight_decay=weight_decay,
                                      fused=True)
    scaler = grad_scaler(precision, device)  # fp16: scales the loss up, the gradients back down

    def measure(loader: DataLoader, max_batches: int | None) -> dict[str, float]:
        with autocast(precision, device):
            return evaluate_fn(model, loader, max_batches)

    history = History(unit=unit, device=str(device))
    seen, step = 0, 0
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        for epoch in range(1, epochs + 1):
            model.train()
            # One iterator per epoch, made here: given the loader itself, tqdm.auto would make a spare one,
            # which draws a seed from the loader's generator and so changes the order of the batches.
            bar = tqdm(iter(train_loader), total=len(train_loader), desc=f"epoch {epoch}/{epochs}",
                       disable=not progress, leave=False)
            for batch in bar:
                optimizer.zero_grad(set_to_none=True)
                with autocast(precision, device):  # the forward pass; backward follows its types
                    loss = loss_fn(model, batch)
                value = loss.item()
                if not math.isfinite(value):  # stop at once: every later step would be garbage
                    raise RuntimeError(f"the training loss is {value} at step {step + 1} (epoch {epoch}); "
                                       f"training stopped. {NON_FINITE_CAUSES}")
                scaler.scale(loss).backward()  # without fp16: loss.backward()
                scaler.step(optimizer)  # without fp16: optimizer.step()
                scaler.update()
                seen += count_fn(batch)
                step += 1
                history.step_loss.append(value)
                history.step_seen.append(seen)
                bar.set_postfix(loss=f"{history.step_loss[-1]:.3f}")
                if step % eval_every == 0:
                    history.eval_seen.append(seen)
                    history.eval_train_loss.append(measure(train_sample, eval_batches)["loss"])
                    history.eval_val_loss.append(measure(val_loader, eval_batches)["loss"])
            measured = {f"train_{k}": v for k, v in measure(train_sample, eval_batches).items()}
            measured.update({f"validation_{k}": v for k, v in measure(val_loader, None).items()})
            for name, value in measured.items():
                history.epoch_metrics.setdefault(name, []).append(value)
            if progress:
                tqdm.write(f"epoch {epoch}: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}"
                                                          for k, v in measured.items()))
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
    history.wall_time_s = time.perf_counter() - start
    history.peak_memory_mb = memory.peak_mb
    history.peak_memory_kind = memory.kind
    return history
