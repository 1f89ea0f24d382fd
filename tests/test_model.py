from __future__ import annotations

import math

import pytest
import torch

from llm_scratch import GELU, GPTConfig, GPTModel, LayerNorm, causal_attention, count_parameters, generate
from llm_scratch.attention import MultiHeadAttention

EXPECTED_PARAMETERS = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def tiny_model(seed: int = 123, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("tiny", **overrides)).eval()


@pytest.mark.parametrize("name", EXPECTED_PARAMETERS)
def test_exact_parameter_counts_of_the_presets(name):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPTModel(GPTConfig.from_preset(name))
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]
    # The head shares the embedding's tensor; counting it twice would add vocab_size * emb_dim.
    assert model.out_head.weight is model.tok_emb.weight
    naive = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert naive - count_parameters(model) == 50257 * model.cfg.emb_dim


def test_presets_and_overrides():
    cfg = GPTConfig.from_preset("gpt2-xl", drop_rate=0.1)
    shape = (cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.vocab_size, cfg.context_length)
    assert shape == (1600, 25, 48, 50257, 1024)
    assert cfg.qkv_bias and cfg.drop_rate == 0.1 and cfg.head_dim == 64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"emb_dim": 100, "n_heads": 12}, "emb_dim \\(100\\) must be divisible by n_heads \\(12\\)"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": 2.5}, "vocab_size must be a positive integer"),
        ({"drop_rate": 1.0}, "drop_rate must be in \\[0, 1\\)"),
    ],
)
def test_invalid_config_is_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, tiny"):
        GPTConfig.from_preset("gpt3")


def test_layer_norm_and_gelu_follow_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    norm = LayerNorm(16)
    with torch.no_grad():
        norm.scale.uniform_(0.5, 1.5)
        norm.shift.uniform_(-1, 1)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    torch.testing.assert_close(norm(x), norm.scale * (x - mean) / torch.sqrt(var + 1e-5) + norm.shift)
    by_hand = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(GELU()(x), by_hand)


def test_explicit_and_sdpa_attention_agree():
    torch.manual_seed(0)
    attention = MultiHeadAttention(d_in=48, d_out=48, n_heads=6, qkv_bias=True).eval()
    x = torch.randn(3, 17, 48)
    fast = attention(x)
    attention.use_sdpa = False
    slow = attention(x)
    assert fast.shape == (3, 17, 48)
    assert (fast - slow).abs().max().item() < 1e-5


def test_causal_attention_weights_ignore_the_future():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 4, 8).unbind(0)
    out = causal_attention(q, k, v)
    # The first position can only see itself, so its output is its own value vector.
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :])


def test_changing_a_token_never_changes_earlier_logits():
    model = tiny_model()
    for use_sdpa in (True, False):
        for block in model.blocks:
            block.att.use_sdpa = use_sdpa
        idx = torch.randint(0, 50257, (2, 12))
        changed = idx.clone()
        changed[:, 7] = (changed[:, 7] + 1) % 50257
        with torch.no_grad():
            before, after = model(idx), model(changed)
        assert torch.equal(before[:, :7], after[:, :7])
        assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_logits_shape_and_eval_mode_is_deterministic():
    model = tiny_model(drop_rate=0.5)
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        first, second = model(idx), model(idx)
    assert first.shape == (2, 9, 50257)
    assert torch.equal(first, second)
    model.train()  # dropout on: two passes differ
    with torch.no_grad():
        assert not torch.equal(model(idx), model(idx))


def test_same_seed_same_weights():
    a, b = tiny_model(seed=7), tiny_model(seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_too_long_sequence_is_explained():
    model = tiny_model()
    with pytest.raises(ValueError, match="257 tokens but the model's context length is 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


@pytest.mark.parametrize("bad", [50257, -1])
def test_token_id_out_of_range_is_explained(bad):
    model = tiny_model()
    idx = torch.zeros(1, 4, dtype=torch.long)
    idx[0, 2] = bad
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary \\[0, 50256\\]"):
        model(idx)


def test_wrong_shape_or_dtype_is_explained():
    model = tiny_model()
    with pytest.raises(ValueError, match="shape \\(batch, n_tokens\\), got \\(4,\\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))


def test_greedy_generation_is_reproducible_and_matches_argmax():
    model = tiny_model()
    prompt = torch.tensor([[15496, 11, 314, 716]])
    out = generate(model, prompt, max_new_tokens=8, context_size=256)
    assert out.shape == (1, 12) and torch.equal(out[:, :4], prompt)
    assert torch.equal(out, generate(model, prompt, max_new_tokens=8, context_size=256))
    # Every new token is the argmax of the logits for the tokens before it.
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits[0, 3:].argmax(-1), out[0, 4:])


def test_sampling_with_a_seed_is_reproducible_and_respects_top_k():
    model = tiny_model()
    prompt = torch.tensor([[15496, 11]])
    kwargs = dict(max_new_tokens=10, context_size=256, temperature=1.5, top_k=3, seed=42)
    first = generate(model, prompt, **kwargs)
    assert torch.equal(first, generate(model, prompt, **kwargs))
    with torch.no_grad():
        logits = model(first[:, :-1])[0, 1:]  # (10, vocab): the logits each new token was drawn from
    top3 = logits.topk(3, dim=-1).indices
    assert all(token in row for token, row in zip(first[0, 2:].tolist(), top3.tolist(), strict=True))


def test_generation_crops_to_the_context_and_stops_at_eos():
    model = tiny_model()
    long_prompt = torch.randint(0, 50257, (1, 300))  # longer than the tiny model's 256 positions
    out = generate(model, long_prompt, max_new_tokens=2, context_size=256)
    assert out.shape == (1, 302)
    first_token = generate(model, long_prompt[:, :5], max_new_tokens=1, context_size=256)[0, -1].item()
    stopped = generate(model, long_prompt[:, :5], max_new_tokens=5, context_size=256, eos_id=first_token)
    assert stopped.shape == (1, 5)


def test_generate_restores_training_mode_and_checks_arguments():
    model = tiny_model().train()
    generate(model, torch.tensor([[1, 2]]), max_new_tokens=1, context_size=8)
    assert model.training
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, torch.tensor([[1]]), 1, 8, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        generate(model, torch.tensor([[1]]), 1, 8, temperature=1.0, top_k=0)
