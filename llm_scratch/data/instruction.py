"""Instruction data: 1,100 instruction/response pairs that ship with the package, their prompt layout (the
Alpaca style), a fixed split, the token ids of each example and the batches that teach a GPT to answer.

The batches are next-token (inputs, targets) pairs like pretraining's, with two differences: examples have
different lengths, so they are padded, and some targets are set to `IGNORE_INDEX` so that the loss skips
them (the padding, and with `mask_prompt=True` the prompt too). `collate_instructions` says exactly which.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from llm_scratch.data.batching import training_loader
from llm_scratch.tokenizer import EOS_ID, get_tokenizer

INSTRUCTION_RESOURCE = "instruction-data.json"  # Apache-2.0, credited in instruction-data_NOTICE.txt
# A target equal to this does not count in the loss: PyTorch's `F.cross_entropy` skips it by default.
IGNORE_INDEX = -100
PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
SPLIT_SEED = 123
# Shares of train, validation and test in percent; train and test are rounded down and validation gets the
# rest, so the 1,100 shipped entries split into 935 / 55 / 110.
SPLIT_PERCENTS = (85, 5, 10)
# Quick mode trains on the whole training split (the tiny random model needs every example to learn English
# word statistics: on 100 it stops far above half of its starting loss) and measures on the first 10
# validation and 20 test entries of the (shuffled) split. None: every entry.
QUICK_SIZES = (None, 10, 20)
ENTRY_KEYS = ("instruction", "input", "output")


class InstructionEntry(NamedTuple):
    """One example: what to do, what to do it on (often empty) and the expected response."""

    instruction: str
    input: str
    output: str


class InstructionSplits(NamedTuple):
    train: list[InstructionEntry]
    validation: list[InstructionEntry]
    test: list[InstructionEntry]


def format_alpaca(instruction: str, input_text: str = "", response: str = "") -> str:
    """The Alpaca prompt layout: the preamble, the instruction, the input (only if not empty), the response
    header, then `response`. With no response it is the prompt a model continues to answer."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        text += f"\n\n### Input:\n{input_text}"
    return text + f"\n\n### Response:\n{response}"


def _check_entry(raw: object, index: int, name: str) -> InstructionEntry:
    """An `InstructionEntry` from one decoded JSON entry, or a ValueError naming the file, index and key."""
    where = f"{name}: entry {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is a {type(raw).__name__}, not an object with keys "
                         f"{', '.join(ENTRY_KEYS)}")
    for key in ENTRY_KEYS:
        if key not in raw:
            raise ValueError(f"{where} has no key {key!r}; every entry needs {', '.join(ENTRY_KEYS)} "
                             "(\"input\" may be an empty string)")
        if not isinstance(raw[key], str):
            raise ValueError(f"{where}, key {key!r}: expected a string, got {type(raw[key]).__name__}")
    for key in ("instruction", "output"):
        if not raw[key].strip():
            raise ValueError(f"{where}, key {key!r} is empty; only \"input\" may be empty")
    return InstructionEntry(raw["instruction"], raw["input"], raw["output"])


def load_instructions(data_path: str | Path | None = None) -> list[InstructionEntry]:
    """The entries of a JSON list of {"instruction", "input", "output"} objects at `data_path`, or of the
    1,100 that ship with the package; every entry is checked. Other keys of an entry are not read."""
    if data_path is None:
        name = f"llm_scratch/data/{INSTRUCTION_RESOURCE}"
        raw_bytes = resources.files("llm_scratch.data").joinpath(INSTRUCTION_RESOURCE).read_bytes()
    else:
        name = str(data_path)
        if not Path(data_path).is_file():
            raise FileNotFoundError(f"no instruction file at {name}; pass a JSON file, or no path for the "
                                    f"{INSTRUCTION_RESOURCE} that ships with the package")
        raw_bytes = Path(data_path).read_bytes()
    try:
        entries = json.loads(raw_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name} is not UTF-8 JSON ({err})") from err
    if not isinstance(entries, list) or not entries:
        found = "an empty list" if entries == [] else f"a JSON {type(entries).__name__}"
        raise ValueError(f"{name} must hold a non-empty JSON list of entries, got {found}")
    return [_check_entry(raw, index, name) for index, raw in enumerate(entries)]


def split_instructions(entries: Sequence[InstructionEntry], seed: int = SPLIT_SEED) -> InstructionSplits:
    """Shuffle with `seed`, then cut into train (85%), validation (5%) and test (10%): `SPLIT_PERCENTS`."""
    n = len(entries)
    n_train, n_test = n * SPLIT_PERCENTS[0] // 100, n * SPLIT_PERCENTS[2] // 100
    n_validation = n - n_train - n_test
    if min(n_train, n_validation, n_test) < 1:
        raise ValueError(f"{n} entries make an empty split ({n_train} / {n_validation} / {n_test}); "
                         "give at least 10 entries")
    shuffled = list(entries)
    random.Random(seed).shuffle(shuffled)
    return InstructionSplits(train=shuffled[:n_train], validation=shuffled[n_train : n_train + n_validation],
                             test=shuffled[n_train + n_validation :])


def quick_subset(splits: InstructionSplits,
                 sizes: tuple[int | None, int | None, int | None] = QUICK_SIZES) -> InstructionSplits:
    """The first `sizes` entries of each split (they are shuffled already; None: all): quick mode's data."""
    for name, part, size in zip(InstructionSplits._fields, splits, sizes, strict=True):
        if size is not None and not 1 <= size <= len(part):
            raise ValueError(f"the {name} split has {len(part)} entries; cannot take {size} of them")
    return InstructionSplits(*(part[:size] for part, size in zip(splits, sizes, strict=True)))


def load_instruction_splits(data_path: str | Path | None = None, quick: bool = False,
                            seed: int = SPLIT_SEED) -> InstructionSplits:
    """Load (the shipped file by default), split with `seed`, and in quick mode keep `QUICK_SIZES` of it."""
    splits = split_instructions(load_instructions(data_path), seed)
    return quick_subset(splits) if quick else splits


class InstructionExample(NamedTuple):
    """One tokenized example: the prompt's ids then the response's, and where the response starts."""

    token_ids: torch.Tensor  # (n_tokens,)
    response_start: int  # index in token_ids of the response's first token = the prompt's length


class InstructionDataset(Dataset):
    """Token ids of formatted entries. The prompt and the response are encoded apart and joined, so that the
    prompt's ids are exactly what a model is given when it answers, and the response starts at a known index.
    """

    def __init__(self, entries: Sequence[InstructionEntry],
                 tokenizer: tiktoken.Encoding | None = None) -> None:
        tokenizer = tokenizer or get_tokenizer()
        if not entries:
            raise ValueError("InstructionDataset needs at least one entry; the entries given are empty")
        self.entries = list(entries)
        self.token_ids, self.response_starts = [], []
        for index, entry in enumerate(self.entries):
            # encode_ordinary: an "<|endoftext|>" inside an entry is plain text, not the token.
            prompt = tokenizer.encode_ordinary(format_alpaca(entry.instruction, entry.input))
            response = tokenizer.encode_ordinary(entry.output)
            if not response:
                raise ValueError(f"entry {index} ({entry.instruction!r:.40}) has a response with no tokens")
            self.token_ids.append(prompt + response)
            self.response_starts.append(len(prompt))
        self.lengths = [len(ids) for ids in self.token_ids]

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> InstructionExample:
        return InstructionExample(torch.tensor(self.token_ids[index], dtype=torch.long),
                                  self.response_starts[index])


class InstructionBatch(NamedTuple):
    """`inputs` and `targets`, each (batch, n_tokens); a target of `IGNORE_INDEX` does not count."""

    inputs: torch.Tensor
    targets: torch.Tensor


def collate_instructions(batch: Sequence[InstructionExample], mask_prompt: bool = False,
                         max_length: int | None = None, eos_id: int = EOS_ID) -> InstructionBatch:
    """Pad a list of examples into next-token inputs and targets, (batch, n_tokens) each.

    An example of n tokens whose response starts at index s, in a batch whose longest example has L tokens:
    inputs = its n tokens, then end-of-text up to L; targets[t] = token t + 1 for t < n - 1, end-of-text at
    t = n - 1 (kept: the model learns to stop), IGNORE_INDEX for t >= n (padding). With `mask_prompt`,
    targets[t] = IGNORE_INDEX also for t < s - 1 (the prompt's tokens; t = s - 1 predicts the response's first
    token and counts). `max_length` then keeps the first `max_length` columns of both.
    """
    if not batch:
        raise ValueError("collate_instructions got an empty batch")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
    width = max(len(ids) for ids, _ in batch)
    inputs = torch.full((len(batch), width), eos_id, dtype=torch.long)  # (batch, n_tokens)
    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (batch, n_tokens)
    for row, (ids, response_start) in enumerate(batch):
        n = len(ids)
        inputs[row, :n] = ids
        targets[row, : n - 1] = ids[1:]  # each position predicts the token after it
        targets[row, n - 1] = eos_id  # after the last token: end of text
        if mask_prompt:
            targets[row, : max(response_start - 1, 0)] = IGNORE_INDEX
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    counted = (targets != IGNORE_INDEX).sum(dim=1)  # (batch,)
    if not bool(counted.all()):
        row = int((counted == 0).nonzero()[0])
        raise ValueError(f"example {row} of the batch keeps no target that counts: its prompt has "
                         f"{batch[row].response_start} tokens and max_length is {max_length}; raise "
                         "max_length or train without mask_prompt")
    return InstructionBatch(inputs, targets)


class InstructionLoaders(NamedTuple):
    """DataLoaders of the three splits; each batch is an `InstructionBatch`."""

    train: DataLoader
    validation: DataLoader
    test: DataLoader


def instruction_dataloaders(splits: InstructionSplits, *, batch_size: int = 8, mask_prompt: bool = False,
                            max_length: int | None = None, context_length: int = 1024, bucket: bool = False,
                            seed: int = 123, tokenizer: tiktoken.Encoding | None = None
                            ) -> InstructionLoaders:
    """DataLoaders for training (shuffled with `seed`) and evaluation, padding each batch dynamically.

    `max_length` (default: `context_length`, the most the model can read) truncates longer examples; `bucket`
    batches training examples of similar length together (`LengthBucketSampler`), for less padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = context_length if max_length is None else max_length
    if not 1 <= max_length <= context_length:
        raise ValueError(f"max_length must be between 1 and the model's context_length ({context_length}), "
                         f"got {max_length}")
    datasets = [InstructionDataset(part, tokenizer) for part in splits]
    collate = functools.partial(collate_instructions, mask_prompt=mask_prompt, max_length=max_length)
    return InstructionLoaders(training_loader(datasets[0], batch_size, collate, bucket, seed),
                              DataLoader(datasets[1], batch_size, collate_fn=collate),
                              DataLoader(datasets[2], batch_size, collate_fn=collate))
