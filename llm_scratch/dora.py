"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): LoRA plus a trained length for
each output feature.

DoRA splits the adapted weight of a layer into a direction and a magnitude:

    W' = m * V / ||V||,   V = W + scaling * (A @ B)^T,   ||V|| taken per output feature (row of V)

LoRA's A and B turn the direction V; the vector m, one number per output feature, sets each row's length on
its own. m starts as the row norms of W, so with B = 0 the layer computes exactly what it computed before.
`LinearWithLoRA` holds a `DoRAMagnitude` when its `LoRAConfig` says `use_dora=True`; the maths is here.

||V|| is a constant for autograd (DoRA's section 4.3, and Hugging Face PEFT): the gradient does not flow
through the norm, which saves the memory and time of its backward pass and changes training very little.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoRAMagnitude(nn.Module):
    """DoRA's magnitude vector `m` (out_dim,) and the rescaling it does to a LoRA layer's output."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        # m = ||W[o, :]|| for every output feature o (nn.Linear stores W as (out_dim, in_dim)).
        self.m = nn.Parameter(torch.linalg.vector_norm(weight.detach(), dim=1))  # (out_dim,)
        # ||V|| at the moment of merging: the merged weight alone cannot tell it, and unmerging needs it.
        self.register_buffer("merged_norm", None, persistent=False)

    @torch.no_grad()
    def direction_norm(self, linear: nn.Linear, lora: nn.Module) -> torch.Tensor:
        """||W + scaling * (A @ B)^T|| per output feature, (out_dim,); no gradient flows through it."""
        return torch.linalg.vector_norm(linear.weight + lora.delta_weight().T, dim=1)  # (out_dim,)

    def forward(self, x: torch.Tensor, linear: nn.Linear, lora: nn.Module) -> torch.Tensor:
        """The DoRA layer's output m / ||V|| * (x @ V^T) + bias, for a frozen `linear` and its `LoRALayer`."""
        scale = self.m / self.direction_norm(linear, lora)  # (out_dim,): gradient for m, none for the norm
        if self.training and not isinstance(lora.dropout, nn.Identity):
            # As LoRA's dropout, DoRA's acts on the change only: the frozen layer sees the clean x, the change
            # (scale - 1) * (x W^T) + scale * (x A B * scaling) the dropped-out one. PEFT does the same.
            dropped = lora.dropout(x)
            low_rank = (dropped @ lora.A * lora.scaling) @ lora.B  # (..., out_dim)
            return linear(x) + (scale - 1) * F.linear(dropped, linear.weight) + scale * low_rank
        direction = F.linear(x, linear.weight).add_(lora(x))  # (..., out_dim): x @ V^T, without the bias
        if linear.bias is None:
            return direction * scale
        return torch.addcmul(linear.bias, direction, scale)  # bias + direction * scale, one new tensor

    @torch.no_grad()
    def merged_weight(self, linear: nn.Linear, lora: nn.Module) -> torch.Tensor:
        """m * V / ||V||, (out_dim, in_dim): the weight with which the linear alone computes DoRA."""
        direction = linear.weight + lora.delta_weight().T.to(linear.weight.dtype)  # V, (out_dim, in_dim)
        self.merged_norm = torch.linalg.vector_norm(direction, dim=1)  # (out_dim,)
        return direction * (self.m / self.merged_norm)[:, None]

    @torch.no_grad()
    def unmerged_weight(self, linear: nn.Linear, lora: nn.Module) -> torch.Tensor:
        """W again from the merged weight: merged * ||V|| / m - scaling * (A @ B)^T."""
        if self.merged_norm is None:
            raise RuntimeError("this DoRA layer was not merged by merged_weight, so it cannot be unmerged")
        delta = lora.delta_weight().T.to(linear.weight.dtype)  # (out_dim, in_dim)
        weight = linear.weight * (self.merged_norm / self.m)[:, None] - delta
        self.merged_norm = None
        return weight

    def extra_repr(self) -> str:
        return f"out_dim={self.m.shape[0]}"
