"""The pretraining text and its next-token windows: load the story that ships with the package (or a text
file), tokenize it, split it by position into training and validation parts, cut each part into windows.

A window of `context_length` tokens is the input; the same window moved one token to the right is the
target, so every position learns to predict the token that follows it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import NamedTuple

import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from llm_scratch.tokenizer import get_tokenizer

TEXT_RESOURCE = "the-verdict.txt"  # Edith Wharton, "The Verdict" (1908), public domain; package data
TRAIN_FRACTION = 0.9  # the first 90% of the tokens train, the last 10% validate


def load_text(data_path: str | Path | None = None) -> str:
    """The UTF-8 text at `data_path`, or the short story that ships with the package (no network)."""
    if data_path is None:
        return resources.files("llm_scratch.data").joinpath(TEXT_RESOURCE).read_text(encoding="utf-8")
    path = Path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}; pass the path of a UTF-8 .txt file, or none to "
                                f"train on the story that ships with the package ({TEXT_RESOURCE})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8 first") from err


def split_tokens(token_ids: list[int], train_fraction: float = TRAIN_FRACTION) -> tuple[list[int], list[int]]:
    """Cut the token ids at one position: the first `train_fraction` for training, the rest for validation.

    A cut by position (not a shuffle of windows) keeps every validation token out of every training window.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be between 0 and 1, got {train_fraction}")
    cut = int(train_fraction * len(token_ids))
    return token_ids[:cut], token_ids[cut:]


class NextTokenDataset(Dataset):
    """Windows of a token sequence: input `ids[start : start + context_length]`, target one token later.

    Windows start at 0, stride, 2 * stride, ... as long as the target's last token exists. A stride equal to
    `context_length` uses every token once as a target; a smaller stride makes windows overlap.
    """

    def __init__(self, token_ids: list[int], context_length: int, stride: int) -> None:
        if context_length < 1 or stride < 1:
            raise ValueError(f"context_length and stride must be >= 1, got {context_length} and {stride}")
        if len(token_ids) < context_length + 1:
            raise ValueError(f"{len(token_ids):,} tokens make no window of context_length {context_length} "
                             f"(a window needs {context_length + 1} tokens: its inputs and one more for the "
                             "last target); use a smaller context_length or a longer text")
        self.token_ids = torch.tensor(token_ids, dtype=torch.long)  # (n_tokens,)
        self.context_length = context_length
        self.starts = list(range(0, len(token_ids) - context_length, stride))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.starts[index], self.starts[index] + self.context_length
        return self.token_ids[start:end], self.token_ids[start + 1 : end + 1]  # (context_length,) each


class TextLoaders(NamedTuple):
    """The training loader (shuffled with a seed) and the validation loader (in order) of one text."""

    train: DataLoader
    validation: DataLoader


def text_dataloaders(
    text: str,
    context_length: int,
    stride: int | None = None,
    batch_size: int = 2,
    seed: int = 123,
    tokenizer: tiktoken.Encoding | None = None,
    train_fraction: float = TRAIN_FRACTION,
) -> TextLoaders:
    """Tokenize `text`, split it by position, and batch the windows of each part: (inputs, targets) pairs,
    each (batch, context_length). `stride` defaults to `context_length` (no overlap). Every training window
    is kept (`drop_last=False`); the shuffle has its own generator, so the same seed gives the same order.
    """
    tokenizer = tokenizer or get_tokenizer()
    # encode_ordinary: an "<|endoftext|>" written in the text is read as plain text, not as the token.
    train_ids, val_ids = split_tokens(tokenizer.encode_ordinary(text), train_fraction)
    stride = context_length if stride is None else stride
    try:
        train = NextTokenDataset(train_ids, context_length, stride)
        validation = NextTokenDataset(val_ids, context_length, stride)
    except ValueError as err:
        raise ValueError(f"the text splits into {len(train_ids):,} training and {len(val_ids):,} validation "
                         f"tokens: {err}") from err
    generator = torch.Generator().manual_seed(seed)
    return TextLoaders(DataLoader(train, batch_size, shuffle=True, generator=generator),
                       DataLoader(validation, batch_size, shuffle=False))
