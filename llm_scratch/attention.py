"""Causal multi-head self-attention, the one part of a GPT where tokens look at each other."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def causal_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dropout: nn.Module | None = None
) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v with a causal mask, written out step by step (the teaching path).

    Shapes: queries (..., n_q, head_dim), keys and values (..., n_k, head_dim) with n_k >= n_q; the
    queries are the last n_q positions of the keys' sequence (n_k > n_q when earlier keys are cached).
    """
    n_q, n_k = queries.shape[-2], keys.shape[-2]
    scores = queries @ keys.transpose(-2, -1)  # (..., n_q, n_k): how well each query matches each key
    # Query i sits at position n_k - n_q + i and may only look at keys up to there, never at the future.
    future = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).triu(diagonal=n_k - n_q + 1)
    scores = scores.masked_fill(future, float("-inf"))
    # Dividing by sqrt(head_dim) keeps the scores' variance near 1, so softmax does not saturate.
    weights = torch.softmax(scores / math.sqrt(keys.shape[-1]), dim=-1)  # each row sums to 1
    if dropout is not None:
        weights = dropout(weights)
    return weights @ values  # (..., n_q, head_dim): a weighted average of the values


class MultiHeadAttention(nn.Module):
    """Causal self-attention with `n_heads` heads and separate query, key and value projections.

    Separate `nn.Linear` layers (GPT-2's checkpoint stores the three side by side as one) let LoRA target
    each projection by name. `use_sdpa` picks PyTorch's fused `scaled_dot_product_attention` (fast) or
    `causal_attention` above (readable); both compute the same thing from the same weights.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_heads: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        if d_out % n_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_heads ({n_heads})")
        self.d_out = d_out
        self.n_heads = n_heads
        self.head_dim = d_out // n_heads
        self.use_sdpa = use_sdpa
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # mixes what the heads found
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_tokens, d_out) -> (batch, n_heads, n_tokens, head_dim)."""
        batch, n_tokens, _ = x.shape
        return x.view(batch, n_tokens, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, _ = x.shape  # (batch, n_tokens, d_in)
        queries = self.split_heads(self.W_query(x))  # (batch, n_heads, n_tokens, head_dim)
        keys = self.split_heads(self.W_key(x))
        values = self.split_heads(self.W_value(x))

        if self.use_sdpa:
            p = self.dropout.p if self.training else 0.0
            context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=p, is_causal=True)
        else:
            context = causal_attention(queries, keys, values, self.dropout)
        # (batch, n_heads, n_tokens, head_dim) -> (batch, n_tokens, d_out): heads side by side again
        context = context.transpose(1, 2).reshape(batch, n_tokens, self.d_out)
        return self.out_proj(context)
