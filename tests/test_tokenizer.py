from __future__ import annotations

import pytest
import tiktoken
import torch

from llm_scratch import tokenizer as tok
from llm_scratch.tokenizer import EOS_ID, get_tokenizer, ids_to_text, text_to_ids

TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]


@pytest.fixture
def fresh_tokenizer(tmp_path, monkeypatch):
    """Build the tokenizer anew, with an empty tiktoken cache so nothing downloaded earlier can help."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


def test_gpt2_ids_with_the_network_unreachable(fresh_tokenizer, no_network):
    tokenizer = get_tokenizer()
    assert tokenizer.encode(TEXT, allowed_special={"<|endoftext|>"}) == IDS
    assert tokenizer.n_vocab == 50257
    assert tokenizer.eot_token == EOS_ID


def test_helpers_round_trip(fresh_tokenizer, no_network):
    ids = text_to_ids(TEXT)
    assert ids.shape == (1, len(IDS)) and ids.dtype == torch.long
    assert ids[0].tolist() == IDS
    assert ids_to_text(ids) == TEXT
    assert ids_to_text(ids[0]) == TEXT


def test_tampered_vocabulary_file_is_refused(fresh_tokenizer, tmp_path, monkeypatch):
    vocab, encoder = tmp_path / "vocab.bpe", tmp_path / "encoder.json"
    vocab.write_text("#version: 0.2\nnot the real merges\n")
    encoder.write_text("{}")
    monkeypatch.setattr(tok, "bundled_vocab_files", lambda: (vocab, encoder))
    with pytest.raises(RuntimeError, match="vocab.bpe is not GPT-2's vocabulary file"):
        get_tokenizer()


def test_without_the_bundled_files_tiktoken_downloads(fresh_tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(tok, "bundled_vocab_files", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: calls.append(name) or "downloaded")
    assert get_tokenizer() == "downloaded"
    assert calls == ["gpt2"]
