"""GPT-2 weights: loader and exporter checked against Hugging Face's GPT-2, bad files, offline download."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

import llm_scratch.pretrained as pretrained
from llm_scratch import GPTConfig, GPTModel, generate
from llm_scratch.pretrained import load_gpt2, save_gpt2_safetensors

TOL = 1e-5  # float32 logits of the same weights, computed by two implementations
# The "tiny" preset's shape: GPT-2's vocabulary, 2 blocks of width 64 with 4 heads, 256 positions.
SMALL_HF = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 50257, "n_positions": 256}


def save_hf(tmp: Path, seed: int, **config) -> tuple[GPT2LMHeadModel, Path]:
    """A random Hugging Face GPT-2 saved as safetensors (with its config.json) in `tmp`."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    model.save_pretrained(tmp, safe_serialization=True)
    return model, tmp / "model.safetensors"


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> tuple[GPT2LMHeadModel, Path]:
    return save_hf(tmp_path_factory.mktemp("small_hf"), seed=1, **SMALL_HF)


@pytest.fixture(scope="module")
def gpt2_small_hf(tmp_path_factory) -> tuple[GPT2LMHeadModel, Path]:
    """Random weights in the gpt2-small shape (124M parameters, a ~500 MB file), written once per run."""
    return save_hf(tmp_path_factory.mktemp("gpt2_small_hf"), seed=2)  # GPT2Config() is gpt2-small


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key).clone() for key in f.keys()}


def max_logit_diff(ours: GPTModel, hf: GPT2LMHeadModel, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids) - hf(ids).logits).abs().max().item()


def hf_greedy_choices(hf: GPT2LMHeadModel, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """The tokens Hugging Face's model picks greedily after each prefix of `tokens` (1, n) beyond the prompt.

    One forward pass gives them all: the model is causal, so its logits at position t depend only on
    tokens[:, :t + 1], exactly as in a token-by-token greedy loop; if they match `tokens`, so does that loop.
    """
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits  # (1, n - 1, vocab_size)
    return logits[:, n_prompt - 1:].argmax(dim=-1)  # (1, n - n_prompt)


# ---------------------------------------------------------------------------------------------------------
# Equal to Hugging Face, both ways
# ---------------------------------------------------------------------------------------------------------


def test_small_hf_checkpoint_gives_hf_logits_and_tokens(small_hf):
    hf, path = small_hf
    model = load_gpt2(weights_path=path)  # no name: sizes from the shapes, n_heads from config.json
    assert model.cfg == GPTConfig(vocab_size=50257, context_length=256, emb_dim=64, n_heads=4, n_layers=2)
    assert model.out_head.weight is model.tok_emb.weight and not model.training
    ids = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    diff = max_logit_diff(model, hf, ids)
    print(f"small config: max |logit difference| = {diff:.2e}")
    assert diff < TOL
    ours = generate(model, ids[:1, :5], max_new_tokens=20, context_size=256)  # (1, 25)
    assert torch.equal(ours[:, 5:], hf_greedy_choices(hf, ours, n_prompt=5))


def test_gpt2_small_shape_gives_hf_logits_and_tokens(gpt2_small_hf):
    hf, path = gpt2_small_hf
    model = load_gpt2("gpt2-small", weights_path=path)  # the name is checked against the file
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    diff = max_logit_diff(model, hf, ids)
    print(f"gpt2-small shape: max |logit difference| = {diff:.2e}")
    assert diff < TOL
    ours = generate(model, ids[:1, :5], max_new_tokens=20, context_size=1024)  # (1, 25)
    assert torch.equal(ours[:, 5:], hf_greedy_choices(hf, ours, n_prompt=5))
    # Exported again, it loads into Hugging Face's GPT-2 with every key in place and the same logits.
    folder = path.parent / "exported"
    save_gpt2_safetensors(model, folder / "model.safetensors", hf_config=True)
    back, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_logit_diff(model, back.eval(), ids) < TOL


def test_our_export_loads_into_hf_with_no_missing_keys(tmp_path):
    torch.manual_seed(3)
    model = GPTModel(GPTConfig(vocab_size=1000, context_length=128, emb_dim=64, n_heads=4, n_layers=2)).eval()
    save_gpt2_safetensors(model, tmp_path / "model.safetensors", hf_config=True)
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ids = torch.randint(0, 1000, (2, 50), generator=torch.Generator().manual_seed(0))
    assert max_logit_diff(model, hf, ids) < TOL
    ours = generate(model, ids[:1, :4], max_new_tokens=20, context_size=128)  # (1, 24)
    assert torch.equal(ours[:, 4:], hf_greedy_choices(hf, ours, n_prompt=4))


def test_export_then_load_round_trip_is_exact(tmp_path):
    # n_heads=2 matches no preset: it can only come from the metadata the exporter writes.
    cfg = GPTConfig(vocab_size=300, context_length=32, emb_dim=48, n_heads=2, n_layers=3, qkv_bias=False)
    torch.manual_seed(4)
    model = GPTModel(cfg).eval()
    path = save_gpt2_safetensors(model, tmp_path / "mine.safetensors")
    loaded = load_gpt2(weights_path=path)
    # No q/k/v bias becomes a zero bias in GPT-2's layout: a different config, the same function.
    assert loaded.cfg == GPTConfig(vocab_size=300, context_length=32, emb_dim=48, n_heads=2, n_layers=3)
    ours, theirs = model.state_dict(), loaded.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    assert set(theirs) - set(ours) == {f"blocks.{i}.att.{w}.bias" for i in range(3)
                                       for w in ("W_query", "W_key", "W_value")}
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_export_refuses_what_gpt2_layout_cannot_hold(tmp_path):
    model = GPTModel(GPTConfig.from_preset("tiny"))
    model.out_head = torch.nn.Linear(64, 2, bias=False)  # a classification head: not tied, not GPT-2's
    with pytest.raises(ValueError, match="output head is not the token embedding"):
        save_gpt2_safetensors(model, tmp_path / "head.safetensors")
    model = GPTModel(GPTConfig.from_preset("tiny"))
    model.blocks[0].att.W_query = torch.nn.Sequential(model.blocks[0].att.W_query)  # a wrapped layer
    with pytest.raises(ValueError, match="no parameter 'blocks.0.att.W_query.weight'.*merge the adapters"):
        save_gpt2_safetensors(model, tmp_path / "wrapped.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written


def test_hub_layout_without_prefix_with_buffers_and_lm_head(small_hf, tmp_path):
    """The files on the Hub have no "transformer." prefix and may hold mask buffers and a tied head."""
    hf, path = small_hf
    tensors = {key.removeprefix("transformer."): value for key, value in tensors_of(path).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    hub_file = tmp_path / "hub.safetensors"
    save_file(tensors, str(hub_file), metadata={"format": "pt"})
    # No metadata and no config.json here: n_heads comes from the preset of the same sizes, "tiny".
    model = load_gpt2(weights_path=hub_file)
    assert model.cfg == GPTConfig.from_preset("tiny")
    ids = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(0))
    assert max_logit_diff(model, hf, ids) < TOL
    assert max_logit_diff(load_gpt2("tiny", weights_path=hub_file), hf, ids) < TOL

    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0  # an untied head cannot be held
    save_file(tensors, str(hub_file))
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        load_gpt2(weights_path=hub_file)


# ---------------------------------------------------------------------------------------------------------
# Bad files: one clear ValueError, raised before any tensor is converted, so no half-loaded model
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def nothing_converted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every checkpoint tensor the loader converts; the bad-file tests expect none."""
    converted: list[str] = []
    original = pretrained.hf_to_ours

    def spy(rule, tensor):
        converted.append(rule.hf_key)
        return original(rule, tensor)

    monkeypatch.setattr(pretrained, "hf_to_ours", spy)
    return converted


def rewrite(path: Path, out: Path, change) -> Path:
    tensors = tensors_of(path)
    change(tensors)
    save_file(tensors, str(out), metadata={"format": "pt"})
    return out


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        load_gpt2(weights_path=tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", ["truncated", "not_safetensors", "empty"])
def test_truncated_or_foreign_file(small_hf, tmp_path, cut, nothing_converted):
    data = small_hf[1].read_bytes()
    content = {"truncated": data[: len(data) // 2], "not_safetensors": b"PK\x03\x04 a zip, not weights" * 9,
               "empty": b""}[cut]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"is not a complete safetensors file.*download it again"):
        load_gpt2(weights_path=bad)
    assert nothing_converted == []


def test_missing_key(small_hf, tmp_path, nothing_converted):
    bad = rewrite(small_hf[1], tmp_path / "bad.safetensors",
                  lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError) as err:
        load_gpt2(weights_path=bad)
    message = str(err.value)
    assert "missing key 'h.1.mlp.c_fc.bias': expected shape (256,), found none" in message
    assert "looks like 'tiny'" in message and nothing_converted == []


def test_wrong_shape_and_unexpected_key(small_hf, tmp_path, nothing_converted):
    def change(t):
        t["transformer.h.0.attn.c_proj.weight"] = torch.zeros(64, 65)
        t["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)

    bad = rewrite(small_hf[1], tmp_path / "bad.safetensors", change)
    with pytest.raises(ValueError) as err:
        load_gpt2("tiny", weights_path=bad)
    message = str(err.value)
    assert "wrong shape for 'h.0.attn.c_proj.weight': expected (64, 64), found (64, 65)" in message
    assert "unexpected key 'h.0.attn.rotary.weight' (found shape (3,))" in message
    assert nothing_converted == []


def test_same_tensor_twice(small_hf, tmp_path):
    bad = rewrite(small_hf[1], tmp_path / "bad.safetensors",
                  lambda t: t.update({"ln_f.bias": t["transformer.ln_f.bias"].clone()}))
    with pytest.raises(ValueError, match="holds 'ln_f.bias' twice"):
        load_gpt2(weights_path=bad)


def test_file_of_another_size_than_the_name(small_hf, gpt2_small_hf, nothing_converted):
    with pytest.raises(ValueError) as err:
        load_gpt2("gpt2-small", weights_path=small_hf[1])
    message = str(err.value)
    assert "does not fit the preset 'gpt2-small'" in message
    assert "wrong shape for 'wte.weight': expected (50257, 768), found (50257, 64)" in message
    assert "... and 140 more" in message  # 28 wrong shapes + 120 missing tensors, 8 of them shown
    assert "the file looks like 'tiny'" in message

    with pytest.raises(ValueError) as err:
        load_gpt2("gpt2-medium", weights_path=gpt2_small_hf[1])
    message = str(err.value)
    assert "wrong shape for 'wte.weight': expected (50257, 1024), found (50257, 768)" in message
    assert "the file looks like 'gpt2-small'" in message and nothing_converted == []


def test_heads_cannot_be_told(tmp_path):
    model = GPTModel(GPTConfig(vocab_size=300, context_length=32, emb_dim=48, n_heads=2, n_layers=1))
    ours = save_gpt2_safetensors(model, tmp_path / "a" / "mine.safetensors")
    plain = rewrite(ours, tmp_path / "plain.safetensors", lambda t: None)  # without our metadata
    with pytest.raises(ValueError, match="cannot tell the number of attention heads.*config.json"):
        load_gpt2(weights_path=plain)
    (tmp_path / "config.json").write_text(json.dumps(pretrained.hf_config_dict(model.cfg)))
    assert load_gpt2(weights_path=plain).cfg.n_heads == 2


def test_unknown_names_and_devices(small_hf):
    with pytest.raises(ValueError, match="unknown GPT-2 size 'gpt3'"):
        load_gpt2("gpt3")
    with pytest.raises(ValueError, match="unknown preset 'gpt2-tiny'"):
        load_gpt2("gpt2-tiny", weights_path=small_hf[1])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            load_gpt2(weights_path=small_hf[1], device="cuda")


# ---------------------------------------------------------------------------------------------------------
# The download path, with no network
# ---------------------------------------------------------------------------------------------------------


def test_failed_download_says_what_was_tried_and_the_ways_on(monkeypatch, tmp_path, no_network):
    def fail(repo_id, filename, cache_dir=None, **kwargs):
        raise LocalEntryNotFoundError("cannot reach huggingface.co and the file is not in the cache")

    monkeypatch.setattr(pretrained, "hf_hub_download", fail)
    with pytest.raises(RuntimeError) as err:
        load_gpt2("gpt2-medium", cache_dir=tmp_path / "hf-cache")
    message = str(err.value)
    for part in ("openai-community/gpt2-medium", "model.safetensors", str(tmp_path / "hf-cache"),
                 "LocalEntryNotFoundError", "weights_path=", "HF_ENDPOINT", "LLM_SCRATCH_QUICK=1"):
        assert part in message, part


def test_download_goes_through_hf_hub_download(monkeypatch, tmp_path, gpt2_small_hf, no_network):
    calls = []

    def fake_download(repo_id, filename, cache_dir=None, **kwargs):
        calls.append((repo_id, filename, cache_dir))
        return str(gpt2_small_hf[1])  # as if it were in the cache

    monkeypatch.setattr(pretrained, "hf_hub_download", fake_download)
    model = load_gpt2(cache_dir=tmp_path)  # the default name is gpt2-small
    assert calls == [("openai-community/gpt2", "model.safetensors", tmp_path)]
    assert model.cfg == GPTConfig.from_preset("gpt2-small")


# ---------------------------------------------------------------------------------------------------------
# Memory: loading holds one copy of the weights (plus one block), not two
# ---------------------------------------------------------------------------------------------------------

# VmHWM is the process's peak resident memory in KiB. (Not ru_maxrss: Linux carries that over from the
# parent, here pytest, into a child process.)
PEAK_RSS_SCRIPT = """
import re, sys
import torch
from llm_scratch.pretrained import load_gpt2
def peak_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
baseline = peak_kib()  # torch and the package imported, nothing loaded yet
model = load_gpt2(weights_path=sys.argv[1])
print(baseline, peak_kib())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_peak_memory_of_loading_gpt2_small(gpt2_small_hf):
    path = gpt2_small_hf[1]
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path)],
                            capture_output=True, text=True, check=True)
    baseline_kib, peak_kib = map(int, result.stdout.split())
    mib = 1024
    file_mib = path.stat().st_size / 2**20
    extra = (peak_kib - baseline_kib) / mib
    print(f"peak RSS {peak_kib / mib:.0f} MiB = baseline {baseline_kib / mib:.0f} MiB + {extra:.0f} MiB "
          f"for a {file_mib:.0f} MiB file ({extra / file_mib:.2f}x)")
    # One full copy is the model itself; two copies (e.g. the whole file kept mapped while converting)
    # would be >= 1.5x.
    assert extra < 1.4 * file_mib, f"loading used {extra:.0f} MiB for a {file_mib:.0f} MiB file"
