"""The optimizer every training loop of the package uses: AdamW with one weight-decay rule, and the
learning-rate schedule (a linear warm-up, then constant or a cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from llm_scratch.model import LayerNorm

LR_SCHEDULES = ("constant", "cosine")


def no_weight_decay(model: nn.Module) -> set[int]:
    """ids of the parameters that AdamW must not pull towards 0: every bias and the normalization layers'
    scale and shift. They set offsets and scales, not how features mix; decaying them only biases the model
    (nanoGPT and Hugging Face's Trainer exempt them too). Every optimizer the package builds uses this."""
    exempt = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, (LayerNorm, nn.LayerNorm)):
                exempt.add(id(param))
    return exempt


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: those `no_weight_decay` exempts, and the rest."""
    exempt = no_weight_decay(model)
    trainable = [param for param in model.parameters() if param.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in exempt], "weight_decay": weight_decay},
              {"params": [p for p in trainable if id(p) in exempt], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
              min_lr_ratio: float = 0.1) -> float:
    """The learning rate of step `step` (0, 1, ...) as a fraction of the peak: a linear warm-up over the first
    `warmup_steps` steps (1/w, 2/w, ..., 1), then constant, or a cosine from 1 down to `min_lr_ratio` at
    the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)  # 0 after warm-up, 1 at the end
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def adamw(model: nn.Module, lr: float, weight_decay: float,
          param_groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups` (e.g. LoRA+'s), or over `weight_decay_groups`; fused=True: one kernel updates
    every tensor, where the plain loop makes several passes over each (on a CPU, a tenth of a full
    fine-tuning step of gpt2-small; benchmarks/RESULTS.md). The same update."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter; choose what trains first (e.g. "
                         "llm_scratch.methods.prepare_for_method)")
    if param_groups is None:
        param_groups = weight_decay_groups(model, weight_decay)
    grouped = [param for group in param_groups for param in group["params"]]
    if len(grouped) != len(trainable) or {id(p) for p in grouped} != {id(p) for p in trainable}:
        raise ValueError(f"param_groups must hold every trainable parameter once and nothing else; they "
                         f"hold {len(grouped)} tensors, the model has {len(trainable)} trainable")
    # Copies of the groups: AdamW writes its defaults into the dicts it is given.
    return torch.optim.AdamW([dict(g) for g in param_groups], lr=lr, weight_decay=weight_decay, fused=True)
