"""The GPT-2 architecture: LayerNorm, GELU, FeedForward, TransformerBlock and GPTModel."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_scratch.attention import KVCache, MultiHeadAttention
from llm_scratch.config import GPTConfig


class LayerNorm(nn.Module):
    """Normalize each token vector to mean 0 and variance 1, then scale and shift it (learned).

    y = scale * (x - mean) / sqrt(var + eps) + shift, with the biased variance, as GPT-2. The fused
    `F.layer_norm` computes exactly this formula; notebook 01 writes it out and checks that they agree.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GPT-2's activation, in its tanh approximation:
    0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3))).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Two linear layers around a GELU, applied to each token alone: emb_dim -> 4 * emb_dim -> emb_dim."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)  # expand
        self.gelu = GELU()
        self.fc2 = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)  # project back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gelu(self.fc1(x)))  # (batch, n_tokens, emb_dim)


class TransformerBlock(nn.Module):
    """An unassuming transformer block: attention, then feed-forward, each on a residual path.

    Pre-norm, as GPT-2: each sub-layer sees a normalized copy of x and adds its result back to x, so the
    residual stream carries the signal (and the gradient) straight through a deep stack.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            n_heads=cfg.n_heads,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
        )
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache))  # (batch, n_tokens, emb_dim)
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2: token and position embeddings, a stack of transformer blocks, a final norm, an output head.

    `model(idx)` maps token ids (batch, n_tokens) to logits (batch, n_tokens, vocab_size): for every
    position, a score for each possible next token. `model(new_ids, cache=cache)` continues a sequence
    whose earlier tokens are in `cache` (from `new_kv_cache`), as `generate(..., use_cache=True)` does.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        # Weight tying, as in GPT-2: the output head reuses the token embedding matrix. Reading a token in
        # and scoring it as the next token use the same vector per token, which saves vocab_size * emb_dim
        # parameters (38.6M of gpt2-small's 124M) and is how OpenAI trained the released weights.
        self.out_head.weight = self.tok_emb.weight
        # Activation checkpointing (off by default): training keeps only each block's input for the backward
        # pass and runs the block's forward again there: one more forward pass, for much less memory.
        self.checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 scales the init of the layers that write into the residual stream by 1/sqrt(2 * n_layers),
        # so the stream's variance does not grow with depth (two such writes per block).
        for name, param in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.fc2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def check_token_ids(self, idx: torch.Tensor) -> None:
        """Raise a clear ValueError when `idx` is not a (batch, n_tokens) tensor of valid token ids."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"expected token ids of shape (batch, n_tokens), got {shape}; for one text use "
                             "ids.unsqueeze(0)")
        if idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"expected integer token ids (torch.long), got {idx.dtype}")
        n_tokens, context = idx.shape[1], self.cfg.context_length
        if n_tokens > context:
            raise ValueError(
                f"the sequence has {n_tokens} tokens but the model's context length is {context}; "
                f"keep the last {context} tokens: idx[:, -{context}:]"
            )
        # The range check reads the ids' values, which on a GPU would make the CPU wait for the GPU at every
        # call; so it runs on CPU tensors only (the package's datasets and prompts are built, and checked,
        # on the CPU). On a GPU an id out of range still fails, inside the embedding.
        if idx.numel() and idx.device.type == "cpu":
            low, high = int(idx.min()), int(idx.max())
            if low < 0 or high >= self.cfg.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size - 1}]")

    def new_kv_cache(self, max_tokens: int | None = None) -> list[KVCache]:
        """An empty key/value cache for `forward(..., cache=...)`: one `KVCache` per transformer block.

        `max_tokens` (default: the context length) bounds how many tokens it holds; memory comes at first use.
        """
        max_tokens = self.cfg.context_length if max_tokens is None else max_tokens
        return [KVCache(max_tokens) for _ in self.blocks]

    def forward(self, idx: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        self.check_token_ids(idx)
        n_tokens = idx.shape[1]
        start = 0  # position of idx's first token in the whole sequence
        if cache is not None:
            if len(cache) != len(self.blocks):
                raise ValueError(f"the cache has {len(cache)} layers but the model has {len(self.blocks)} "
                                 "blocks; make it with model.new_kv_cache()")
            start = cache[0].n_tokens  # the cached tokens come first, so idx continues after them
            if start + n_tokens > self.cfg.context_length:
                raise ValueError(
                    f"the cache holds {start} tokens and {n_tokens} new ones make {start + n_tokens}, more "
                    f"than the model's context length {self.cfg.context_length}; start a new cache from the "
                    f"last tokens (at most {self.cfg.context_length})"
                )
        x = self.embed(idx, start)  # (batch, n_tokens, emb_dim)
        x = self.run_blocks(x, cache=cache)  # (batch, n_tokens, emb_dim)
        x = self.final_norm(x)
        return self.out_head(x)  # (batch, n_tokens, vocab_size), or (..., num_classes) for a classifier

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token plus position embeddings (then dropout) of token ids (batch, n_tokens) whose first token
        sits at position `start` of the sequence."""
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)  # (n_tokens,)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (batch, n_tokens, emb_dim)
        return self.drop_emb(x)

    def run_blocks(self, x: torch.Tensor, start_block: int = 0, stop_block: int | None = None,
                   cache: list[KVCache] | None = None) -> torch.Tensor:
        """Hidden states (batch, n_tokens, emb_dim) through blocks `start_block` to `stop_block - 1` (default:
        to the last one).

        `forward` runs them all; `llm_scratch.frozen_prefix` runs frozen first blocks once and the rest often.
        With `model.checkpointing = True`, training recomputes each block in backward instead of storing what
        its backward needs (QLoRA's recipe; the dropout masks come out the same the second time).
        """
        recompute = self.checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i in range(start_block, len(self.blocks) if stop_block is None else stop_block):
            if recompute:
                x = checkpoint(self.blocks[i], x, use_reentrant=False)  # (batch, n_tokens, emb_dim)
            else:
                x = self.blocks[i](x, None if cache is None else cache[i])  # (batch, n_tokens, emb_dim)
        return x


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch `model` to eval mode (no dropout) inside the `with` block, and back to its mode after it,
    even when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a tensor shared by two layers (the tied embedding and head) counts once."""
    # model.parameters() yields each Parameter object once, however many modules hold it.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
