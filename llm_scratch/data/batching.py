"""Batching the SMS Spam Collection: token ids per message, padded batches, length buckets, DataLoaders.

`SpamDataset` tokenizes `SpamRow`s from `llm_scratch.data.sms_spam`; `collate_spam` right-pads them into a
`SpamBatch` that keeps each message's length, so the classifier can read the last real token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from llm_scratch.data.sms_spam import SpamRow, SpamSplits
from llm_scratch.tokenizer import EOS_ID, get_tokenizer


class SpamDataset(Dataset):
    """Token ids and labels of SMS messages, each truncated to `max_length` tokens, with its length kept.

    `max_length=None` means the longest message of this data set; give the validation and test sets the
    training set's `max_length` so that all three see messages the same way. Never over `context_length`.
    """

    def __init__(self, rows: Iterable[tuple[str, int]], tokenizer=None, max_length: int | None = None,
                 context_length: int = 1024) -> None:
        tokenizer = tokenizer or get_tokenizer()
        rows = [SpamRow(text, int(label)) for text, label in rows]
        if not rows:
            raise ValueError("SpamDataset needs at least one message; the rows given are empty")
        if max_length is not None and not 1 <= max_length <= context_length:
            raise ValueError(f"max_length must be between 1 and the model's context_length "
                             f"({context_length}), got {max_length}")
        # encode_ordinary: a message that contains "<|endoftext|>" is read as plain text, not as the token.
        encoded = [tokenizer.encode_ordinary(row.text) for row in rows]
        for index, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"message {index} ({rows[index].text!r:.40}) encodes to no tokens at all")
        longest = max(len(ids) for ids in encoded)
        self.max_length = min(longest, context_length) if max_length is None else max_length
        self.encoded = [ids[: self.max_length] for ids in encoded]
        self.lengths = [len(ids) for ids in self.encoded]  # after truncation: where each message ends
        self.labels = [row.label for row in rows]
        self.texts = [row.text for row in rows]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor(self.encoded[index], dtype=torch.long), self.labels[index]


class SpamBatch(NamedTuple):
    """A padded batch: `input_ids` (batch, n_tokens), `lengths` (batch,) real tokens, `labels` (batch,)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor


def collate_spam(batch: Sequence[tuple[torch.Tensor, int]], pad_id: int = EOS_ID,
                 pad_to: int | None = None) -> SpamBatch:
    """Right-pad a list of (token_ids, label) with `pad_id` to the batch's longest message, or to `pad_to`.

    For fixed-length batches in a DataLoader: `collate_fn=functools.partial(collate_spam, pad_to=120)`.
    """
    if not batch:
        raise ValueError("collate_spam got an empty batch")
    lengths = torch.tensor([len(ids) for ids, _ in batch], dtype=torch.long)  # (batch,)
    longest = int(lengths.max())
    n_tokens = longest if pad_to is None else pad_to
    if n_tokens < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest message in the batch ({longest} "
                         "tokens); build the SpamDataset with max_length <= pad_to")
    # Padding goes on the right. With causal attention a real token never attends to a later position, so
    # the logits at `lengths - 1` (the last real token, which classification reads) are the same as without
    # any padding; the padded positions' outputs are simply never used.
    input_ids = torch.full((len(batch), n_tokens), pad_id, dtype=torch.long)  # (batch, n_tokens)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = ids
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.long)  # (batch,)
    return SpamBatch(input_ids, lengths, labels)


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of messages of similar length, so that dynamic padding adds few padding tokens.

    Each epoch: shuffle all indices, cut them into pools of `pool_batches` batches, sort each pool by length,
    cut it into batches, and shuffle the order of the batches. Every message comes exactly once per epoch;
    the same `seed` gives the same batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 123,
                 pool_batches: int = 50) -> None:
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size} and {pool_batches}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.pool_batches = pool_batches
        self.pool_size = batch_size * pool_batches
        self.generator = torch.Generator().manual_seed(seed)  # advances every epoch: new batches each time

    def __len__(self) -> int:
        full_pools, rest = divmod(len(self.lengths), self.pool_size)
        return full_pools * self.pool_batches + math.ceil(rest / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.pool_size):
            pool = order[start : start + self.pool_size]
            pool.sort(key=lambda index: self.lengths[index])  # stable: ties keep their random order
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        for position in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[position]


def training_loader(dataset: Dataset, batch_size: int, collate_fn: Callable, bucket: bool = False,
                    seed: int = 123) -> DataLoader:
    """The training DataLoader: shuffled by its own generator seeded with `seed`, or with `bucket` batches of
    similar lengths (`LengthBucketSampler` over `dataset.lengths`). The same seed gives the same batches."""
    if bucket:
        return DataLoader(dataset, batch_sampler=LengthBucketSampler(dataset.lengths, batch_size, seed),
                          collate_fn=collate_fn)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size, shuffle=True, generator=generator, collate_fn=collate_fn)


class SpamLoaders(NamedTuple):
    """DataLoaders of the three splits; `max_length` is the training set's, shared by all three."""

    train: DataLoader
    validation: DataLoader
    test: DataLoader
    max_length: int


def spam_dataloaders(splits: SpamSplits, *, batch_size: int = 8, context_length: int = 1024,
                     max_length: int | None = None, pad_to: int | None = None, bucket: bool = False,
                     seed: int = 123, tokenizer=None) -> SpamLoaders:
    """DataLoaders for training (shuffled with `seed`) and evaluation, padding each batch dynamically.

    `pad_to` pads every batch to that many tokens instead (the fixed padding of other courses); `bucket`
    groups training messages of similar length into batches (`LengthBucketSampler`), for less padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    train = SpamDataset(splits.train, tokenizer, max_length, context_length)
    validation = SpamDataset(splits.validation, tokenizer, train.max_length, context_length)
    test = SpamDataset(splits.test, tokenizer, train.max_length, context_length)
    collate = functools.partial(collate_spam, pad_to=pad_to)
    return SpamLoaders(
        train=training_loader(train, batch_size, collate, bucket, seed),
        validation=DataLoader(validation, batch_size, collate_fn=collate),
        test=DataLoader(test, batch_size, collate_fn=collate),
        max_length=train.max_length,
    )
