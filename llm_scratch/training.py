"""One training loop for every fine-tuning method (full, last block, LoRA), with its history."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from llm_scratch.classifier import classification_loss, evaluate
from llm_scratch.config import pick_device
from llm_scratch.lora import mark_only_lora_trainable, replace_linear_with_lora
from llm_scratch.model import GPTModel

METHODS = ("full", "last-block", "lora")

# Learning rates for AdamW, per method. Full and last-block fine-tuning move pretrained weights, so they
# take the small step size usual for fine-tuning a pretrained transformer (5e-5). LoRA trains only the new
# A and B matrices (and the new head) starting from B = 0; with the alpha / rank scaling (alpha = rank
# here, so a scaling of 1) the update of W is A @ B itself, and a 10x larger step (5e-4) lets it grow
# in a few epochs, as is common for LoRA.
DEFAULT_LR = {"full": 5e-5, "last-block": 5e-5, "lora": 5e-4}


def prepare_for_method(
    model: GPTModel, method: str, rank: int = 16, alpha: float = 16.0, seed: int = 123
) -> list[str]:
    """Decide which parameters train: every one (full), the last block + final norm + head (last-block),
    or new LoRA matrices beside every Linear in the blocks + the head (lora). Returns the names trained.

    `seed` fixes the random start of LoRA's A matrices: the same seed, the same adapter at step 0.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "lora":
        torch.manual_seed(seed)
        replace_linear_with_lora(model, rank=rank, alpha=alpha)
        mark_only_lora_trainable(model, also=("out_head",))
    else:
        trained_parts = (f"blocks.{len(model.blocks) - 1}.", "final_norm.", "out_head.")
        for name, param in model.named_parameters():
            param.requires_grad = method == "full" or name.startswith(trained_parts)
    return [name for name, param in model.named_parameters() if param.requires_grad]


@dataclass
class History:
    """What happened during training, for plots and for `metrics.json`."""

    step_loss: list[float] = field(default_factory=list)  # training loss of every step
    step_examples: list[int] = field(default_factory=list)  # examples seen after every step
    eval_examples: list[int] = field(default_factory=list)  # examples seen at each evaluation
    eval_train_loss: list[float] = field(default_factory=list)  # loss on a few training batches
    eval_val_loss: list[float] = field(default_factory=list)
    eval_val_accuracy: list[float] = field(default_factory=list)
    epoch_train_accuracy: list[float] = field(default_factory=list)  # on up to `eval_batches` batches
    epoch_val_accuracy: list[float] = field(default_factory=list)  # on the whole validation set
    epoch_val_loss: list[float] = field(default_factory=list)
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


def train_classifier(
    model: nn.Module,
    train_loader,
    val_loader,
    *,
    epochs: int = 5,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    eval_every: int = 50,
    eval_batches: int = 5,
    seed: int = 123,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> History:
    """Train every parameter with `requires_grad` by AdamW on the classification loss; return the History.

    Every `eval_every` steps the loss on `eval_batches` training and validation batches is recorded; after
    each epoch, the accuracy on `eval_batches` training batches and on the whole validation set.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter; call prepare_for_method first")
    # Loss and accuracy on the training set are estimated on its first `eval_batches` batches, read in a
    # fixed order: iterating the shuffled loader for that would change the order training sees.
    train_sample = DataLoader(train_loader.dataset, batch_size=train_loader.batch_size or 8,
                              collate_fn=train_loader.collate_fn)
    device = device if isinstance(device, torch.device) else pick_device(device)
    torch.manual_seed(seed)
    model.to(device)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    history = History(device=str(device))
    examples, step = 0, 0
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        for epoch in range(1, epochs + 1):
            model.train()
            bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
            for batch in bar:
                optimizer.zero_grad(set_to_none=True)
                loss = classification_loss(model, batch)
                loss.backward()
                optimizer.step()
                examples += len(batch.labels)
                step += 1
                history.step_loss.append(loss.item())
                history.step_examples.append(examples)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step % eval_every == 0:
                    train_loss, _ = evaluate(model, train_sample, eval_batches)
                    val_loss, val_acc = evaluate(model, val_loader, eval_batches)
                    history.eval_examples.append(examples)
                    history.eval_train_loss.append(train_loss)
                    history.eval_val_loss.append(val_loss)
                    history.eval_val_accuracy.append(val_acc)
            _, train_acc = evaluate(model, train_sample, eval_batches)
            val_loss, val_acc = evaluate(model, val_loader)
            history.epoch_train_accuracy.append(train_acc)
            history.epoch_val_accuracy.append(val_acc)
            history.epoch_val_loss.append(val_loss)
            if progress:
                tqdm.write(f"epoch {epoch}: train accuracy {train_acc:.1%} (on {eval_batches} batches), "
                           f"validation accuracy {val_acc:.1%}, validation loss {val_loss:.3f}")
    history.wall_time_s = time.perf_counter() - start
    history.peak_memory_mb = memory.peak_mb
    history.peak_memory_kind = memory.kind
    return history
