"""Run a frozen, deterministic start of the model once per message, then train and evaluate the rest often.

Last-block fine-tuning freezes the embeddings and every block but the last; with `drop_rate = 0` they have no
dropout either. They then map each message to the same hidden states at every epoch, so running them again at
every step repeats work. `skip_frozen_prefix` runs them once per message and returns the rest of the model
(`AfterPrefix`: the remaining blocks, the final norm, the head) with loaders of the stored hidden states that
make the very batches the token loaders would have made. The training loop, the loss and
`evaluate_classifier` stay as they are: they see a smaller model and batches of hidden states instead of
token ids.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from llm_scratch.data import SpamLoaders, collate_spam
from llm_scratch.model import GPTModel

PREFIX_BATCH_SIZE = 32  # messages per forward pass while the hidden states are computed


def frozen_prefix_blocks(model: GPTModel) -> int:
    """How many leading blocks run the same way at every step: with the embeddings, none of their parameters
    has `requires_grad` and none of their dropouts drops (`cfg.drop_rate == 0`). 0 when the embeddings train
    or drop, or block 0 trains: then nothing can be computed once."""

    def fixed(module: nn.Module) -> bool:
        trains = any(param.requires_grad for param in module.parameters())
        drops = any(isinstance(layer, nn.Dropout) and layer.p > 0 for layer in module.modules())
        return not trains and not drops

    if not all(fixed(part) for part in (model.tok_emb, model.pos_emb, model.drop_emb)):
        return 0
    n_blocks = 0
    while n_blocks < len(model.blocks) and fixed(model.blocks[n_blocks]):
        n_blocks += 1
    return n_blocks


@torch.no_grad()
def prefix_states(model: GPTModel, dataset: Dataset, n_blocks: int, progress: bool = False,
                  batch_size: int = PREFIX_BATCH_SIZE) -> list[torch.Tensor]:
    """Each message's hidden states after the embeddings and the first `n_blocks` blocks, unpadded: fp32
    (n_tokens, emb_dim) tensors on the model's device, in the order of `dataset` ((token_ids, label) items).

    Messages of similar length run together, right-padded: with causal attention no real token sees the
    padding after it, so each message gets the states it would get alone (up to float rounding).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(dataset)), key=lambda index: len(dataset[index][0]))
    states: list[torch.Tensor] = [torch.empty(0)] * len(dataset)
    bar = tqdm(range(0, len(order), batch_size), desc="the frozen prefix", disable=not progress, leave=False)
    for start in bar:
        indices = order[start : start + batch_size]
        batch = collate_spam([dataset[index] for index in indices])
        model.check_token_ids(batch.input_ids)
        x = model.embed(batch.input_ids.to(device))  # (batch, n_tokens, emb_dim)
        x = model.run_blocks(x, stop_block=n_blocks)  # (batch, n_tokens, emb_dim)
        for row, (index, length) in enumerate(zip(indices, batch.lengths.tolist(), strict=True)):
            states[index] = x[row, :length].float().clone()  # (length, emb_dim); clone: free the batch
    return states


class PrefixDataset(Dataset):
    """The stored hidden states (n_tokens, emb_dim) of each message with its label."""

    def __init__(self, states: list[torch.Tensor], labels: list[int]) -> None:
        if len(states) != len(labels):
            raise ValueError(f"got hidden states of {len(states)} messages but {len(labels)} labels")
        self.states = states
        self.labels = labels

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.states[index], self.labels[index]


class PrefixBatch(NamedTuple):
    """A padded batch of hidden states, in the place of a `SpamBatch`'s token ids: `hidden` (batch, n_tokens,
    emb_dim), `lengths` (batch,) real tokens, `labels` (batch,)."""

    hidden: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor


def collate_prefix(batch: list[tuple[torch.Tensor, int]]) -> PrefixBatch:
    """Right-pad the hidden states of a batch of messages with zeros to its longest message.

    As with token padding, the padded positions come after every real token and causal attention never lets a
    real token read them, so the last real token's output does not depend on them.
    """
    lengths = torch.tensor([len(states) for states, _ in batch], dtype=torch.long)  # (batch,)
    hidden = pad_sequence([states for states, _ in batch], batch_first=True)  # (batch, n_tokens, emb_dim)
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.long)  # (batch,)
    return PrefixBatch(hidden, lengths, labels)


def cached_loader(loader: DataLoader, states: list[torch.Tensor]) -> DataLoader:
    """A loader of the messages' hidden states that makes the same batches as the token `loader`, in the
    same order: it uses `loader`'s own batch sampler and random generator (so iterate only one of the two).
    Each batch is padded to its longest message, whatever `loader` pads to: padding changes no prediction.
    """
    if loader.num_workers != 0:
        raise ValueError("the hidden states stay on the model's device; give loaders with num_workers=0")
    labels = [label for _, label in loader.dataset]
    return DataLoader(PrefixDataset(states, labels), batch_sampler=loader.batch_sampler,
                      generator=loader.generator, collate_fn=collate_prefix)


class AfterPrefix(nn.Module):
    """The part of `model` after its first `n_blocks` blocks: hidden states (batch, n_tokens, emb_dim) ->
    logits (batch, n_tokens, classes). It holds `model` itself, so training it trains `model`."""

    def __init__(self, model: GPTModel, n_blocks: int) -> None:
        super().__init__()
        self.model = model
        self.n_blocks = n_blocks

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.model.run_blocks(hidden, start_block=self.n_blocks)  # (batch, n_tokens, emb_dim)
        return self.model.out_head(self.model.final_norm(x))  # (batch, n_tokens, classes)


class FrozenPrefix(NamedTuple):
    """What `skip_frozen_prefix` gives: the model and loaders to train and evaluate, and what was cached."""

    model: nn.Module  # AfterPrefix, or the model itself when nothing is cached
    loaders: SpamLoaders  # of hidden states, or the token loaders themselves
    n_blocks: int  # blocks run once per message (0: none)
    seconds: float  # time it took to run them
    megabytes: float  # memory the stored hidden states take


def skip_frozen_prefix(model: GPTModel, loaders: SpamLoaders, progress: bool = False) -> FrozenPrefix:
    """Run the model's frozen, deterministic start (`frozen_prefix_blocks`) once for every message of the
    three splits, on the model's device; train and evaluate the returned model on the returned loaders.

    Nothing is cached (the model and loaders come back as they are) when the embeddings or block 0 train or
    drop. The returned loaders share the token loaders' random state: use them instead, not beside them.
    """
    n_blocks = frozen_prefix_blocks(model)
    if n_blocks == 0:
        return FrozenPrefix(model, loaders, 0, 0.0, 0.0)
    device = next(model.parameters()).device
    start = time.perf_counter()
    states = [prefix_states(model, loader.dataset, n_blocks, progress) for loader in loaders[:3]]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the states are computed asynchronously: wait for them to be there
    seconds = time.perf_counter() - start
    megabytes = sum(s.numel() * s.element_size() for split in states for s in split) / 2**20
    cached = SpamLoaders(*(cached_loader(loader, split) for loader, split in zip(loaders[:3], states,
                                                                                   strict=True)),
                         max_length=loaders.max_length)
    if progress:
        print(f"computed once: the embeddings and the first {n_blocks} of {len(model.blocks)} blocks (frozen)"
              f" for {sum(map(len, states)):,} messages ({megabytes:,.1f} MB on {device}) in {seconds:.1f} s")
    return FrozenPrefix(AfterPrefix(model, n_blocks), cached, n_blocks, seconds, megabytes)
