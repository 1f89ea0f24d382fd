"""Causal multi-head self-attention, the one part of a GPT where tokens look at each other."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(n_q: int, n_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n_q, n_k) booleans, True where a query may look at a key: at its own position and before.

    The queries are the last n_q of n_k positions (n_k > n_q when earlier keys are cached), so query i sits
    at position n_k - n_q + i and sees keys 0 .. n_k - n_q + i, never the future.
    """
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=n_k - n_q)


def causal_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dropout: nn.Module | None = None
) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v with a causal mask, written out step by step (the teaching path).

    Shapes: queries (..., n_q, head_dim), keys and values (..., n_k, head_dim) with n_k >= n_q; the
    queries are the last n_q positions of the keys' sequence (n_k > n_q when earlier keys are cached).
    """
    n_q, n_k = queries.shape[-2], keys.shape[-2]
    scores = queries @ keys.transpose(-2, -1)  # (..., n_q, n_k): how well each query matches each key
    allowed = causal_mask(n_q, n_k, scores.device)  # (n_q, n_k)
    scores = scores.masked_fill(~allowed, float("-inf"))  # a score of -inf gets a softmax weight of 0
    # Dividing by sqrt(head_dim) keeps the scores' variance near 1, so softmax does not saturate.
    weights = torch.softmax(scores / math.sqrt(keys.shape[-1]), dim=-1)  # each row sums to 1
    if dropout is not None:
        weights = dropout(weights)
    return weights @ values  # (..., n_q, head_dim): a weighted average of the values


class KVCache:
    """The keys and values one attention layer has computed so far, so a new token computes only its own.

    During generation the keys and values of earlier tokens never change (a causal model never looks
    ahead), so recomputing them at every step is wasted work. Memory is allocated once, at the first
    `append`, for `max_tokens` positions, and new keys are written in place: `torch.cat` at every step
    would copy the whole cache again and again (n^2 work over a generation) for the same result.
    Made for inference (under `torch.no_grad()`, as `generate` runs): autograd cannot see through the
    in-place writes.
    """

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"a KVCache needs room for at least 1 token, got max_tokens={max_tokens}")
        self.max_tokens = max_tokens
        self.n_tokens = 0  # positions filled so far
        self.keys: torch.Tensor | None = None  # (batch, n_heads, max_tokens, head_dim) once allocated
        self.values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys and values (batch, n_heads, n_new, head_dim); return all of them so far.

        The result is (batch, n_heads, n_tokens, head_dim): views of the cache, no copy.
        """
        batch, n_heads, n_new, head_dim = keys.shape
        if self.keys is None:
            shape = (batch, n_heads, self.max_tokens, head_dim)
            self.keys = keys.new_empty(shape)
            self.values = values.new_empty(shape)
        elif (batch, n_heads, head_dim) != (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3]):
            raise ValueError(
                f"this cache holds keys for batch {self.keys.shape[0]}, {self.keys.shape[1]} heads of width "
                f"{self.keys.shape[3]}, got batch {batch}, {n_heads} heads of width {head_dim}; use a new "
                "cache for a new batch"
            )
        start, end = self.n_tokens, self.n_tokens + n_new
        if end > self.max_tokens:
            raise ValueError(
                f"the cache holds {start} tokens and {n_new} new ones would make {end}, more than its "
                f"max_tokens={self.max_tokens}; make a bigger cache or start again from fewer tokens"
            )
        self.keys[:, :, start:end] = keys  # write in place: (batch, n_heads, n_new, head_dim)
        self.values[:, :, start:end] = values
        self.n_tokens = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # (batch, n_heads, n_tokens, head_dim)


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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(batch, n_tokens, d_in) -> (batch, n_tokens, d_out). With a `cache`, x holds only the new tokens:
        they attend to the cached earlier tokens and to each other, and their keys and values join the cache.
        """
        batch, n_tokens, _ = x.shape  # (batch, n_tokens, d_in)
        # each (batch, n_tokens, d_out)
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        queries = self.split_heads(queries)  # (batch, n_heads, n_tokens, head_dim)
        keys, values = self.split_heads(keys), self.split_heads(values)
        n_cached = 0
        if cache is not None:
            n_cached = cache.n_tokens
            # (batch, n_heads, n_cached + n_tokens, head_dim): the earlier tokens' keys, then the new ones
            keys, values = cache.append(keys, values)

        if self.use_sdpa:
            p = self.dropout.p if self.training else 0.0
            if n_cached == 0:  # keys and queries are the same positions: the usual causal mask
                context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=p, is_causal=True)
            else:
                # SDPA's is_causal aligns its mask to the top left, i.e. as if the queries were the first
                # positions; ours are the last n_tokens of n_k, so we give the mask ourselves (True = may
                # attend). A single new token may attend to every key, so it needs no mask at all.
                mask = causal_mask(n_tokens, keys.shape[-2], x.device) if n_tokens > 1 else None
                context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=p)
        else:
            context = causal_attention(queries, keys, values, self.dropout)  # handles n_k > n_q itself
        # (batch, n_heads, n_tokens, head_dim) -> (batch, n_tokens, d_out): heads side by side again
        context = context.transpose(1, 2).reshape(batch, n_tokens, self.d_out)
        return self.out_proj(context)
