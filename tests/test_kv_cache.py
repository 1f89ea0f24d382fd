"""The KV cache: same logits and tokens as without it, less work, clear errors; the benchmark runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_scratch import GPTConfig, GPTModel, generate
from llm_scratch.attention import KVCache, MultiHeadAttention

TOL = 1e-5  # float32: the same sums, taken in a different grouping


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than two, and not stalled by other jobs on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 123, use_sdpa: bool = True) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig.from_preset("tiny")).eval()
    for block in model.blocks:
        block.att.use_sdpa = use_sdpa
    return model


def random_ids(batch: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n_tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_prefill_then_step_by_step_gives_the_full_forward_logits(use_sdpa):
    model = tiny_model(use_sdpa=use_sdpa)
    ids = random_ids(2, 20)
    cache = model.new_kv_cache()
    with torch.no_grad():
        full = model(ids)  # (2, 20, vocab): no cache
        pieces = [model(ids[:, :7], cache=cache)]  # prefill: 7 tokens into an empty cache
        pieces.append(model(ids[:, 7:11], cache=cache))  # 4 tokens after 7 cached: needs the shifted mask
        pieces += [model(ids[:, i : i + 1], cache=cache) for i in range(11, 20)]  # one token at a time
    cached = torch.cat(pieces, dim=1)
    assert cached.shape == full.shape == (2, 20, 50257)
    assert cache[0].n_tokens == cache[1].n_tokens == 20
    assert (cached - full).abs().max().item() < TOL


def test_attention_with_cache_equals_attention_over_the_whole_sequence():
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_in=48, d_out=48, n_heads=6, qkv_bias=True).eval()
    x = torch.randn(3, 10, 48)
    for use_sdpa in (True, False):
        attention.use_sdpa = use_sdpa
        cache = KVCache(max_tokens=10)
        with torch.no_grad():
            parts = [attention(x[:, :4], cache), attention(x[:, 4:9], cache), attention(x[:, 9:], cache)]
            whole = attention(x)
        assert (torch.cat(parts, dim=1) - whole).abs().max().item() < TOL
        # The cached keys are the keys of the whole sequence, split into heads: (3, 6, 10, 8).
        expected_keys = attention.split_heads(attention.W_key(x))
        assert cache.keys.shape == (3, 6, 10, 8)
        assert (cache.keys - expected_keys).abs().max().item() < TOL


def test_cache_is_allocated_once_and_written_in_place():
    model = tiny_model()
    cache = model.new_kv_cache(max_tokens=12)
    with torch.no_grad():
        model(random_ids(1, 5), cache=cache)
        address = cache[0].keys.data_ptr()
        for i in range(7):
            model(random_ids(1, 1, seed=i), cache=cache)
    assert cache[0].keys.data_ptr() == address  # no new tensor per step
    assert cache[0].keys.shape == (1, 4, 12, 16) and cache[0].n_tokens == 12


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_are_identical_with_and_without_cache(use_sdpa, batch):
    model = tiny_model(use_sdpa=use_sdpa)
    prompt = random_ids(batch, 6)
    without = generate(model, prompt, max_new_tokens=30, context_size=256)
    with_cache = generate(model, prompt, max_new_tokens=30, context_size=256, use_cache=True)
    assert with_cache.shape == (batch, 36)
    assert torch.equal(with_cache, without)


def test_sampled_tokens_with_a_seed_are_identical_with_and_without_cache():
    model = tiny_model()
    prompt = random_ids(2, 5)
    kwargs = dict(max_new_tokens=25, context_size=256, temperature=1.3, top_k=50, seed=7)
    without = generate(model, prompt, **kwargs)
    with_cache = generate(model, prompt, use_cache=True, **kwargs)
    assert torch.equal(with_cache, without)
    other_seed = generate(model, prompt, use_cache=True, **{**kwargs, "seed": 8})
    assert not torch.equal(other_seed, with_cache)  # the seed matters, so the equality above means something


@pytest.mark.parametrize(
    ("n_prompt", "context_size"),
    [
        (10, 16),  # the sequence outgrows context_size after 6 new tokens
        (20, 16),  # the prompt is already longer than context_size
        (252, 256),  # the sequence outgrows the model's own context length after 4 new tokens
    ],
)
def test_tokens_stay_identical_when_the_sequence_outgrows_the_context(n_prompt, context_size):
    model = tiny_model()
    prompt = random_ids(1, n_prompt)
    for kwargs in ({}, {"temperature": 1.0, "seed": 3}):
        without = generate(model, prompt, 9, context_size, **kwargs)
        with_cache = generate(model, prompt, 9, context_size, use_cache=True, **kwargs)
        assert with_cache.shape == (1, n_prompt + 9)
        assert torch.equal(with_cache, without)


def test_the_cache_feeds_each_token_once_until_the_context_is_full():
    model = tiny_model()
    n_fed = []  # tokens embedded per forward pass
    model.tok_emb.register_forward_hook(lambda module, inputs, output: n_fed.append(inputs[0].shape[1]))
    generate(model, random_ids(1, 5), max_new_tokens=6, context_size=256)
    assert n_fed == [5, 6, 7, 8, 9, 10]  # without a cache: the whole sequence at every step
    n_fed.clear()
    generate(model, random_ids(1, 5), max_new_tokens=6, context_size=256, use_cache=True)
    assert n_fed == [5, 1, 1, 1, 1, 1]  # the prompt once, then only the newest token
    n_fed.clear()
    generate(model, random_ids(1, 5), max_new_tokens=6, context_size=7, use_cache=True)
    assert n_fed == [5, 1, 1, 7, 7, 7]  # past context_size positions shift, so all 7 are fed again


def test_eos_stops_the_cached_generation_at_the_same_place():
    model = tiny_model()
    prompt = random_ids(1, 5)
    first = generate(model, prompt, max_new_tokens=8, context_size=256)
    eos = first[0, 8].item()  # the 4th new token
    stopped = generate(model, prompt, max_new_tokens=8, context_size=256, eos_id=eos, use_cache=True)
    assert torch.equal(stopped, generate(model, prompt, max_new_tokens=8, context_size=256, eos_id=eos))
    assert stopped.shape[1] <= 8 and bool((stopped[0, 5:] != eos).all())


def test_model_with_cache_still_validates_its_input():
    model = tiny_model()
    cache = model.new_kv_cache()
    bad = torch.tensor([[1, 50257]])
    with pytest.raises(ValueError, match="token id 50257 is outside the vocabulary"):
        model(bad, cache=cache)
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 3), cache=cache)
    assert cache[0].n_tokens == 0  # nothing was stored by the failed calls
    with torch.no_grad():
        model(random_ids(1, 250), cache=cache)
        with pytest.raises(ValueError, match="holds 250 tokens and 7 new ones make 257, more than the "
                                             "model's context length 256"):
            model(random_ids(1, 7), cache=cache)
        with pytest.raises(ValueError, match="the cache has 1 layers but the model has 2 blocks"):
            model(random_ids(1, 1), cache=cache[:1])


def test_cache_errors_are_explained():
    with pytest.raises(ValueError, match="room for at least 1 token"):
        KVCache(max_tokens=0)
    model = tiny_model()
    cache = model.new_kv_cache(max_tokens=4)
    with torch.no_grad():
        model(random_ids(2, 3), cache=cache)
        with pytest.raises(ValueError, match="holds 3 tokens and 2 new ones would make 5, more than its "
                                             "max_tokens=4"):
            model(random_ids(2, 2), cache=cache)
        with pytest.raises(ValueError, match="keys for batch 2.*got batch 1.*use a new cache"):
            model(random_ids(1, 1), cache=cache)
    with pytest.raises(ValueError, match="use_cache=True needs a model with new_kv_cache"):
        generate(nn.Identity(), random_ids(1, 2), 1, 8, use_cache=True)


def test_cache_adds_no_parameters_or_saved_state():
    model = tiny_model()
    keys_before = list(model.state_dict())
    generate(model, random_ids(1, 4), max_new_tokens=3, context_size=256, use_cache=True)
    assert list(model.state_dict()) == keys_before
    assert not list(model.buffers())


def test_benchmark_smoke_run_reports_matching_tokens(capsys, benchmark_script):
    bench = benchmark_script("bench_generate")
    result = bench.main(["--smoke", "--threads", "1"])
    assert torch.get_num_threads() == 1  # restored to what it was (the fixture's 1)
    printed = capsys.readouterr().out
    assert result["tokens_match"] is True
    assert set(result["tokens_per_second"]) == {"ours, no cache", "ours, KV cache",
                                                "Hugging Face generate (its cache)"}
    assert all(speed > 0 for speed in result["tokens_per_second"].values())
    assert "| ours, KV cache |" in printed and "greedy tokens of all 3 methods identical: True" in printed
    cached = bench.main(["--smoke", "--threads", "1", "--cached-only"])
    assert cached["tokens_match"] is True and "ours, no cache" not in cached["tokens_per_second"]
