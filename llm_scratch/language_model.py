"""A GPT as a language model: the next-token loss, perplexity, training with the generic loop, and text.

The loss is the mean cross-entropy of every position's logits against the token that follows it;
perplexity is exp(loss): as uncertain as a uniform choice among that many tokens. A target equal to
`IGNORE_INDEX` (-100) does not count: instruction batches use it for padding and, if masked, for the prompt.
Pretraining's windows have no such target, so for them every position counts.
"""

from __future__ import annotations

import math

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn

from llm_scratch.data.instruction import IGNORE_INDEX
from llm_scratch.generate import generate
from llm_scratch.model import eval_mode
from llm_scratch.tokenizer import ids_to_text, text_to_ids
from llm_scratch.training import History, train


def next_token_loss(model: nn.Module, batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a batch of (inputs, targets), each (batch, n_tokens), over the targets that count.

    "mean" averages over those tokens, not over examples: a batch's long responses weigh more than its short
    ones, as every token does in `evaluate_language_model`. "sum" adds them up (for averages over batches).
    """
    inputs, targets = batch
    device = next(model.parameters()).device
    logits = model(inputs.to(device))  # (batch, n_tokens, vocab_size)
    # One row per position: (batch * n_tokens, vocab_size) against (batch * n_tokens,) target ids.
    return F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


@torch.no_grad()
def evaluate_language_model(model: nn.Module, loader, max_batches: int | None = None) -> dict[str, float]:
    """{"loss": next-token loss per counted token, "perplexity": exp(loss)} over `loader` (or its first
    `max_batches` batches), in eval mode: the sum of every counted token's loss over their number, so that
    batches with more counted tokens weigh more (the mean of the batch means would not)."""
    total_loss, n_tokens = 0.0, 0
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            total_loss += next_token_loss(model, batch, reduction="sum").item()
            n_tokens += count_tokens(batch)
    if n_tokens == 0:
        raise ValueError("cannot evaluate on an empty data loader, or one whose targets all are IGNORE_INDEX")
    loss = total_loss / n_tokens
    return {"loss": loss, "perplexity": math.exp(loss)}


def count_tokens(batch) -> int:
    """How many targets of a batch of (inputs, targets) count (are not IGNORE_INDEX): the `seen` unit."""
    return int((batch[1] != IGNORE_INDEX).sum())


def train_language_model(model: nn.Module, train_loader, val_loader, **settings) -> History:
    """The generic `training.train` with the next-token loss, perplexity as a metric, tokens as unit.

    `settings` are `train`'s: epochs, lr, weight_decay, eval_every, eval_batches, seed, device, progress,
    on_epoch_end, precision.
    """
    return train(model, train_loader, val_loader, next_token_loss, evaluate_fn=evaluate_language_model,
                 count_fn=count_tokens, unit="tokens", **settings)


def complete_text(
    model: nn.Module,
    prompt: str,
    max_new_tokens: int = 30,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    context_size: int | None = None,
    tokenizer: tiktoken.Encoding | None = None,
) -> str:
    """The prompt and its continuation by `model`, as text (greedy by default; see `generate`).

    `context_size` (default: the model's context length) is how many of the last tokens the model sees.
    """
    device = next(model.parameters()).device
    ids = text_to_ids(prompt, tokenizer).to(device)  # (1, n_prompt)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one word to continue")
    context_size = model.cfg.context_length if context_size is None else context_size
    out = generate(model, ids, max_new_tokens, context_size=context_size,
                   temperature=temperature, top_k=top_k, seed=seed, use_cache=True)
    return ids_to_text(out.cpu(), tokenizer)
