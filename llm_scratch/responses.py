"""A model's responses to instructions: greedy generation with the KV cache from the Alpaca prompt, stopped at
end-of-text or after `max_new_tokens` new tokens.

Examples are answered one at a time. A batch would not give the same tokens with this package's `generate`:
it stops only once every sequence has chosen end-of-text, and prompts of different lengths padded on the left
would move every token to another position (GPT-2's positions are absolute).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import tiktoken
import torch
from torch import nn
from tqdm.auto import tqdm

from llm_scratch.data.instruction import InstructionEntry, format_alpaca
from llm_scratch.generate import generate
from llm_scratch.tokenizer import EOS_ID, get_tokenizer

# Over twice the longest reference response of the shipped data (50 tokens). After the longest prompt (65
# tokens) it still fits the tiny model's 256-token context, so the KV cache serves every step; a sequence
# longer than the context recomputes the whole window at each step, about 50 times slower per token on a CPU.
# (The reference course allows 256 new tokens, for GPT-2's 1,024-token context.)
DEFAULT_MAX_NEW_TOKENS = 128


class Response(NamedTuple):
    """An instruction, its input, the reference response, the model's response, and whether the model ended
    it with end-of-text (within `max_new_tokens`; else it was cut off)."""

    instruction: str
    input: str
    reference: str
    response: str
    ended_with_eos: bool


def generate_response_ids(model: nn.Module, prompt_ids: list[int],
                          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[list[int], bool]:
    """The token ids `model` writes after `prompt_ids`, greedily, without the end-of-text; and whether it
    chose end-of-text within `max_new_tokens` new tokens (counting the end-of-text)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, n_prompt)
    out = generate(model, idx, max_new_tokens, context_size=model.cfg.context_length, eos_id=EOS_ID,
                   use_cache=True)  # (1, n_prompt + n_new): generate leaves the end-of-text out
    new_ids = out[0, len(prompt_ids) :].tolist()
    # Fewer tokens than allowed means generate stopped because the next token was end-of-text.
    return new_ids, len(new_ids) < max_new_tokens


def respond(model: nn.Module, instruction: str, input_text: str = "",
            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, tokenizer: tiktoken.Encoding | None = None) -> str:
    """The model's response to one instruction (and its input, if any), as text."""
    if not instruction.strip():
        raise ValueError("the instruction is empty; write what the model should do")
    tokenizer = tokenizer or get_tokenizer()
    prompt_ids = tokenizer.encode_ordinary(format_alpaca(instruction, input_text))
    new_ids, _ = generate_response_ids(model, prompt_ids, max_new_tokens)
    return tokenizer.decode(new_ids)


def generate_responses(model: nn.Module, entries: Sequence[InstructionEntry],
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       tokenizer: tiktoken.Encoding | None = None, progress: bool = True) -> list[Response]:
    """The model's response to every entry, in order, with a progress bar: to score against the references."""
    tokenizer = tokenizer or get_tokenizer()
    responses = []
    for entry in tqdm(entries, desc="responses", disable=not progress):
        prompt_ids = tokenizer.encode_ordinary(format_alpaca(entry.instruction, entry.input))
        new_ids, ended = generate_response_ids(model, prompt_ids, max_new_tokens)
        response = tokenizer.decode(new_ids)
        responses.append(Response(entry.instruction, entry.input, entry.output, response, ended))
    return responses
