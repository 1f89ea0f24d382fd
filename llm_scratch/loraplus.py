"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B takes larger steps
than A.

A LoRA layer adds x A B, A (in_dim, rank), B (rank, out_dim). Adam moves every entry by about the learning
rate, whatever the size of its gradient. A step on A changes the output through (x dA) B, where x dA sums
in_dim terms that the gradient has aligned with x: its effect grows with the width. A step on B changes it
through (x A) dB, which sums only `rank` terms: its effect does not grow. So with one learning rate, B (which
starts at zero) learns too slowly in wide layers; LoRA+ gives B a learning rate `loraplus_lr_ratio` times
A's (16 is the usual choice): the same cost per step, usually faster training. Notebook 07 measures it.

    groups = loraplus_param_groups(model, lr=5e-4, loraplus_lr_ratio=16)
    torch.optim.AdamW(groups, lr=5e-4, weight_decay=0.01)       # or train(..., param_groups=groups)
"""

from __future__ import annotations

import math

from torch import nn

from llm_scratch.lora import lora_layers
from llm_scratch.optimizer import no_weight_decay


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float) -> list[dict]:
    """Optimizer parameter groups for LoRA+: every trainable tensor once, B at `lr * loraplus_lr_ratio`.

    The groups are those of Hugging Face PEFT's `create_loraplus_optimizer`: matrices (A, the head's weight)
    at `lr`; B and every other 1-D tensor (DoRA's m, biases) at `lr * loraplus_lr_ratio`. Weight decay
    follows the package's one rule (`llm_scratch.optimizer.no_weight_decay`): none on biases and norms; the
    other groups take the optimizer's weight decay.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    ratio = loraplus_lr_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
        raise ValueError(f"loraplus_lr_ratio must be a finite number > 0 (B's learning rate over A's; the "
                         f"LoRA+ paper suggests 16), got {ratio!r}")
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("LoRA+ sets the learning rate of LoRA's B matrices, and the model has none; call "
                           "replace_linear_with_lora(model, ...) first")
    b_matrices = {id(layer.lora.B) for layer in layers.values()}
    exempt = no_weight_decay(model)  # the package's one rule: no decay on biases and norms
    a_group, b_group, b_no_decay = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) not in b_matrices and param.ndim != 1:
            a_group.append(param)  # A and other matrices, e.g. the classification head's weight
        elif id(param) in exempt:
            b_no_decay.append(param)  # biases and norms
        else:
            b_group.append(param)  # B, and 1-D tensors such as DoRA's magnitudes
    groups = [{"params": a_group, "lr": lr}, {"params": b_group, "lr": lr * ratio},
              {"params": b_no_decay, "lr": lr * ratio, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
