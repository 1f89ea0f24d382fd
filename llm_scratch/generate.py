"""Text generation: pick the next token again and again (greedy, temperature and top-k sampling)."""

from __future__ import annotations

import torch
from torch import nn

from llm_scratch.model import eval_mode


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = False,
) -> torch.Tensor:
    """Extend `idx` (batch, n_tokens) by up to `max_new_tokens` tokens and return (batch, n_tokens + new).

    temperature 0 picks the most likely token (greedy, deterministic); a positive temperature samples from
    softmax(logits / temperature), restricted to the `top_k` most likely tokens if given. Only the last
    `context_size` tokens are fed to the model. Generation stops early once every sequence's next token
    is `eos_id`. `seed` makes sampling reproducible. `use_cache=True` keeps each layer's keys and values
    (a KV cache, see `GPTModel.new_kv_cache`), so each step computes only the new token: same tokens, faster.
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (batch, n_tokens), got {tuple(idx.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    cache = None
    if use_cache:
        if not hasattr(model, "new_kv_cache"):
            raise ValueError(f"use_cache=True needs a model with new_kv_cache() (a GPTModel), got "
                             f"{type(model).__name__}; pass use_cache=False")
        # Room for the whole generation, or for context_size tokens, after which the cache is not used.
        cache = model.new_kv_cache(max_tokens=max(1, min(context_size, idx.shape[1] + max_new_tokens)))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)

    with eval_mode(model), torch.no_grad():  # no dropout while generating
        for _ in range(max_new_tokens):
            if cache is not None and idx.shape[1] <= context_size:
                # Feed only the tokens the cache has not seen yet: the whole prompt at the first step,
                # then the one token chosen at the step before.
                logits = model(idx[:, cache[0].n_tokens :], cache=cache)[:, -1, :]  # (batch, vocab_size)
            else:
                # No cache, or the sequence outgrew context_size: the model sees the last context_size
                # tokens at positions 0.. which all shift by one at each step, so every key and value
                # changes and there is nothing to reuse; recompute them all (as without a cache).
                logits = model(idx[:, -context_size:])[:, -1, :]  # (batch, vocab_size): the last position
            idx_next = next_token(logits, temperature, top_k, generator)  # (batch, 1)
            if eos_id is not None and bool((idx_next == eos_id).all()):
                break
            idx = torch.cat([idx, idx_next], dim=1)  # (batch, n_tokens + 1)
    return idx


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose one token id per row of `logits` (batch, vocab_size); returns (batch, 1)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
