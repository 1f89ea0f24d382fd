"""NF4 and QLoRA: the code values, the 4-bit quantization bit for bit against bitsandbytes (CPU), double
quantization, the 4-bit Linear layer and LoRA beside it, storage, training, adapters and PEFT export."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_lora import N_CLASSES, randomize_lora, tiny_model, token_ids
from torch import nn

from llm_scratch import nf4
from llm_scratch.adapters import load_lora, lora_state_dict, save_lora
from llm_scratch.config import GPTConfig
from llm_scratch.lora import LinearWithLoRA, LoRAConfig, lora_layers, merge_lora, parameter_summary
from llm_scratch.methods import CLASSIFIER_LORA, prepare_for_method
from llm_scratch.model import GPTModel
from llm_scratch.nf4 import LinearNF4
from llm_scratch.peft_format import save_peft_adapter

bnb = pytest.importorskip("bitsandbytes.functional")

QLORA = dataclasses.replace(CLASSIFIER_LORA, quantize_base="nf4")


def random_weight(shape: tuple[int, ...], scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def bnb_nf4(weight: torch.Tensor, double_quant: bool = False):
    """bitsandbytes' NF4 of `weight`: (packed codes, quant state)."""
    return bnb.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=double_quant)


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit; its PyTorch fallback (odd shapes) runs without torch.compile's wait."""
    with torch.compiler.set_stance("force_eager"):
        return bnb.dequantize_4bit(packed, state)


# ---------------------------------------------------------------- the code values


def test_the_code_table_is_bitsandbytes_and_the_derivation_agrees_to_one_float32_step():
    assert torch.equal(nf4.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))  # bit for bit
    derived = nf4.normal_float_code()
    assert derived.dtype == torch.float32 and torch.equal(derived, derived.sort().values)
    assert (derived < 0).sum() == 7 and (derived > 0).sum() == 8 and derived[7] == 0
    assert derived[0] == -1 and derived[-1] == 1
    # They agree to 1.2e-7 (relative 4.9e-7); 6 of the 16 values are equal (0, -1, 1 and three others).
    difference = (derived - nf4.NF4_CODE).abs()
    assert difference.max() <= 1.2e-7 and (difference / nf4.NF4_CODE.abs().clamp(min=0.05)).max() < 5e-7
    assert (difference == 0).sum() == 6
    # The gap is float32 rounding: bitsandbytes took quantiles at float32 probabilities (torch.linspace) and
    # divided in float32. The same quantiles at those probabilities give its table bit for bit.
    normal = NormalDist()
    probabilities = [torch.linspace(nf4.NF4_OFFSET, 0.5, n)[:-1].tolist() for n in (9, 8)]
    values = torch.tensor(sorted([normal.inv_cdf(p) for p in probabilities[0]] + [0.0]
                                 + [-normal.inv_cdf(p) for p in probabilities[1]]))  # float32
    assert torch.equal(values / values.max(), nf4.NF4_CODE)
    assert math.isclose(nf4.NF4_OFFSET, 1 - (1 / 30 + 1 / 32) / 2, abs_tol=1e-7)  # the paper's offset


def test_the_dynamic_8_bit_code_is_bitsandbytes():
    assert torch.equal(nf4.dynamic_code(), bnb.create_dynamic_map())


# ---------------------------------------------------------------- 4-bit quantization against bitsandbytes


def gpt2_c_attn() -> torch.Tensor:
    """A GPT-2 c_attn weight as Hugging Face stores it (Conv1D: in x out = 768 x 2304), GPT-2's init."""
    return random_weight((768, 2304), 0.02)


CASES = {  # name: (weight, what it checks)
    "c_attn 768x2304": gpt2_c_attn(),
    "odd size 7x9 (one short block, a half byte)": random_weight((7, 9), 3.0),
    "one value": random_weight((1, 1), 1.0),
    "33x65 small scale": random_weight((33, 65), 1e-3),
    "100x70 unit scale": random_weight((100, 70), 1.0),
    "a vector of 1000": random_weight((1000,), 0.1),
    "heavy tails (x^3)": random_weight((64, 128), 1.0) ** 3,
    "a zero block": torch.cat([torch.zeros(64), random_weight((192,), 0.5)]).view(4, 64),
}


@pytest.mark.parametrize("weight", CASES.values(), ids=CASES.keys())
def test_codes_absmax_and_dequantized_weights_are_bit_identical_to_bitsandbytes(weight: torch.Tensor):
    packed, absmax = nf4.quantize_nf4(weight)
    their_packed, state = bnb_nf4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(weight.numel() / 2),)
    assert torch.equal(packed, their_packed.view(-1))
    assert torch.equal(absmax, state.absmax)
    for dtype in (torch.float32, torch.bfloat16):
        state.dtype = dtype
        theirs = bnb_dequantize(their_packed, state).view(weight.shape)  # a vector comes back (1, n)
        assert torch.equal(nf4.dequantize_nf4(packed, absmax, weight.shape, dtype), theirs)


def test_where_bitsandbytes_cpu_kernel_misplaces_blocks_ours_matches_its_pytorch_reference():
    """On CPUs with AVX-512 (seen on an Intel Xeon and an AMD EPYC VM), bitsandbytes 0.50's CPU
    dequantization gives some shapes (rows of 96, 160 or 32 values) the absmax of the wrong block, which its
    own quantizer did not use; on an AMD EPYC VM without AVX-512 it reads them right. Its pure-PyTorch backend
    always reads the flat blocks as its quantizer writes them, and so do we."""
    from bitsandbytes.backends.default import ops

    compiled = ops._dequantize_4bit_compute
    reference = getattr(compiled, "__wrapped__", compiled)  # the function itself, without torch.compile
    weight = random_weight((64, 96), 1.0)
    packed, absmax = nf4.quantize_nf4(weight)
    their_packed, state = bnb_nf4(weight)
    assert torch.equal(packed, their_packed.view(-1)) and torch.equal(absmax, state.absmax)
    ours = nf4.dequantize_nf4(packed, absmax, weight.shape)
    assert torch.equal(ours, reference(their_packed.view(-1), absmax, state.code, 64, weight.shape,
                                       torch.float32))
    assert (ours - weight).abs().max() < 0.5  # NF4's error
    cpu_kernel = bnb_dequantize(their_packed, state)
    if not torch.equal(cpu_kernel, ours):  # the misplaced blocks: an error larger than NF4's
        assert (cpu_kernel - weight).abs().max() > 0.5


def test_our_gpt2_small_attention_weights_quantize_as_in_bitsandbytes():
    """Ours stores query, key and value as three (out, in) = 768 x 768 Linear weights; each quantizes to
    bitsandbytes' codes, and the 4-bit layer holds exactly them."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt2-small", n_layers=1, vocab_size=8)
    attention = GPTModel(cfg).blocks[0].att
    for linear in (attention.W_query, attention.W_key, attention.W_value):
        layer = LinearNF4.from_linear(linear, double_quant=False)
        their_packed, state = bnb_nf4(linear.weight.detach())
        assert torch.equal(layer.packed, their_packed.view(-1)) and torch.equal(layer.absmax, state.absmax)
        assert torch.equal(layer.dequantize(), bnb_dequantize(their_packed, state))


def test_nearest_code_breaks_ties_downwards():
    code = nf4.NF4_CODE
    midpoints = (code[:-1] + code[1:]) / 2
    assert torch.equal(nf4.nearest_code(midpoints, code).long(), torch.arange(15))  # on a midpoint: down
    above = torch.nextafter(midpoints, torch.tensor(2.0))
    assert torch.equal(nf4.nearest_code(above, code).long(), torch.arange(1, 16))  # just above: up
    assert torch.equal(nf4.nearest_code(code, code).long(), torch.arange(16))


# ---------------------------------------------------------------- double quantization


@pytest.mark.parametrize("weight", [gpt2_c_attn(), random_weight((1000, 1000), 0.1)],
                         ids=["c_attn", "1000x1000"])
def test_double_quantization_against_bitsandbytes(weight: torch.Tensor):
    """Offset and scales are bit-identical. The 8-bit codes here are the nearest code values; bitsandbytes'
    CPU kernel searches the code coarsely and takes another one for about 0.2% of the absmax values (mostly
    the neighbour, for values near a midpoint), so those blocks differ by a code step, and ours is closer."""
    packed, absmax = nf4.quantize_nf4(weight)
    codes, scales, offset = nf4.quantize_absmax(absmax)
    their_packed, state = bnb_nf4(weight, double_quant=True)
    assert torch.equal(packed, their_packed.view(-1))
    assert torch.equal(offset, state.offset) and torch.equal(scales, state.state2.absmax)
    assert codes.dtype == torch.uint8 and scales.shape == (math.ceil(absmax.numel() / 256),)
    differ = codes != state.absmax  # (n_blocks,)
    assert 0 < differ.float().mean() < 0.005

    ours = nf4.dequantize_absmax(codes, scales, offset)
    theirs = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(ours[~differ], theirs[~differ])  # the same code gives the same absmax, bit for bit
    assert ((ours - absmax).abs() <= (theirs - absmax).abs()).all()  # ours is never the farther one

    # The weights: equal wherever the block's absmax code is; elsewhere they differ by code * (absmax step).
    ours_w = nf4.dequantize_nf4(packed, ours, weight.shape).view(-1, 64)  # (n_blocks, 64)
    theirs_w = bnb_dequantize(their_packed, state).view(-1, 64)
    assert torch.equal(ours_w[~differ], theirs_w[~differ])
    step = (ours - theirs).abs()[:, None]  # (n_blocks, 1)
    assert ((ours_w - theirs_w).abs() <= step * 1.000001).all()
    print(f"double quantization: {int(differ.sum())} of {differ.numel()} absmax codes differ; max |weight "
          f"difference| {(ours_w - theirs_w).abs().max():.2e} (max |weight| {weight.abs().max():.2e})")


def test_bits_per_weight_from_the_tensors():
    linear = nn.Linear(768, 768, bias=False)
    n = 768 * 768  # 589,824 = 36 blocks of 64 x 256
    plain, double = LinearNF4.from_linear(linear, double_quant=False), LinearNF4.from_linear(linear)
    assert tensor_bytes(plain) == n // 2 + 4 * n // 64 == 331_776 == n * nf4.bits_per_weight(False) / 8
    assert nf4.bits_per_weight(False) == 4.5
    # codes, 8-bit absmax, a float32 scale per 256 of them, one float32 offset
    assert tensor_bytes(double) == n // 2 + n // 64 + 4 * n // (64 * 256) + 4 == 304_276
    assert tensor_bytes(double) == n * nf4.bits_per_weight() / 8 + 4
    assert nf4.bits_per_weight() == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125


# ---------------------------------------------------------------- storage of whole models


def tensor_bytes(module: nn.Module) -> int:
    """The bytes of every parameter and buffer of `module`, each tensor once (the tied head counts once)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantized_layer_bytes(n: int) -> int:
    """The formula: NF4 codes + 8-bit absmax + float32 scales + the offset, for a weight of n values."""
    return math.ceil(n / 2) + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256) + 4


# name: (parameters of the language model, weights of the Linear layers in the blocks, exact bytes in 4 bits)
STORAGE = {"gpt2-small": (124_439_808, 12 * 7_077_888, 201_836_064),
           "gpt2-xl": (1_557_611_200, 48 * 30_720_000, 1_092_886_528)}


@pytest.mark.parametrize("name", STORAGE)
def test_bytes_of_a_quantized_gpt2(name: str):
    """Every Linear of the blocks in NF4 with double quantization, the rest float32; built on the meta device
    (shapes only), whose tensors a test below checks against a really quantized block."""
    parameters, linear_weights, expected = STORAGE[name]
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset(name))
    assert tensor_bytes(model) == 4 * parameters
    layers = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear)
              and name.startswith("blocks.")}
    assert sum(layers.values()) == linear_weights
    for block in model.blocks:
        nf4.quantize_linears(block)
    counted = tensor_bytes(model)
    assert counted == 4 * (parameters - linear_weights) + sum(map(quantized_layer_bytes, layers.values()))
    assert counted == expected
    # 4.127 bits per weight leaves out only each layer's offset (4 bytes) and, where a layer's absmax count is
    # not a multiple of 256, the rest of its last float32 scale (under 4 bytes)
    formula = 4 * (parameters - linear_weights) + linear_weights * 4.126953125 / 8
    assert 0 <= counted - formula < 8 * len(layers)
    print(f"{name}: {counted:,} bytes in 4 bits against {4 * parameters:,} in float32")


def test_a_meta_device_block_has_the_tensors_of_a_really_quantized_one():
    cfg = GPTConfig.from_preset("gpt2-small")
    with torch.device("meta"):
        meta = GPTModel(dataclasses.replace(cfg, n_layers=1)).blocks[0]
    torch.manual_seed(0)
    real = GPTModel(dataclasses.replace(cfg, n_layers=1, vocab_size=8)).blocks[0]
    nf4.quantize_linears(meta), nf4.quantize_linears(real)
    shapes = {name: (b.shape, b.dtype) for name, b in real.named_buffers()}
    assert shapes == {name: (b.shape, b.dtype) for name, b in meta.named_buffers()}
    assert all(b.is_meta for b in meta.buffers()) and not any(b.is_meta for b in real.buffers())


# ---------------------------------------------------------------- the 4-bit layer and LoRA beside it


def qlora_and_reference(double_quant: bool = True, bias: bool = True):
    """LoRA on a 4-bit layer, and the same LoRA (same A and B) on an nn.Linear holding its dequantized
    weight."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias)
    base = LinearNF4.from_linear(linear, double_quant)
    reference = nn.Linear(96, 80, bias=bias)
    with torch.no_grad():
        reference.weight.copy_(base.dequantize())
        if bias:
            reference.bias.copy_(linear.bias)
    qlora, lora = LinearWithLoRA(base, 8, 16), LinearWithLoRA(reference, 8, 16)
    with torch.no_grad():
        qlora.lora.B.normal_()
        lora.lora.load_state_dict(qlora.lora.state_dict())
    reference.requires_grad_(False)
    return qlora, lora


@pytest.mark.parametrize("double_quant", [True, False], ids=["double quantization", "float32 absmax"])
def test_qlora_layer_equals_lora_on_the_dequantized_weight_forward_and_backward(double_quant: bool):
    qlora, lora = qlora_and_reference(double_quant)
    x = torch.randn(3, 5, 96)
    outputs, grads = [], []
    for layer in (qlora, lora):
        x_in = x.clone().requires_grad_(True)
        out = layer(x_in)
        (out * torch.linspace(-1, 1, 80)).sum().backward()
        outputs.append(out)
        grads.append((layer.lora.A.grad, layer.lora.B.grad, x_in.grad))
    differences = [(outputs[0] - outputs[1]).abs().max()]
    differences += [(a - b).abs().max() for a, b in zip(*grads, strict=True)]
    print("QLoRA vs LoRA on the dequantized weight, max |difference| of output, dA, dB, dx:",
          ", ".join(f"{d:.1e}" for d in differences))
    assert max(differences) <= 1e-6
    assert not any(p.requires_grad for p in qlora.linear.parameters())  # nothing in the 4-bit layer trains


def test_under_bf16_autocast_the_layer_computes_as_nn_linear_does():
    qlora, lora = qlora_and_reference()
    x = torch.randn(4, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, reference = qlora(x), lora(x)
    assert ours.dtype == reference.dtype == torch.bfloat16
    assert torch.equal(ours, reference)  # the same bf16 weight, bias and products


def test_backward_keeps_no_full_precision_copy_of_the_weight():
    """What autograd saves for backward: the 4-bit layer saves nothing of size out x in (nor x, since its
    weight takes no gradient); an nn.Linear on the same input saves its weight (so the check can fail)."""
    qlora, lora = qlora_and_reference()

    def saved_sizes(layer: nn.Module) -> list[int]:
        sizes = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer(torch.randn(2, 96, requires_grad=True))
        return sizes

    assert 96 * 80 not in saved_sizes(qlora.linear)
    assert saved_sizes(qlora.linear) == []
    lora.linear.weight.requires_grad_(True)
    assert 96 * 80 in saved_sizes(lora.linear)


def test_buffers_round_trip_through_state_dict_and_move_with_to():
    qlora, _ = qlora_and_reference()
    state = qlora.state_dict()
    assert {k for k in state if k.startswith("linear.")} == {
        "linear.packed", "linear.absmax_codes", "linear.absmax_scales", "linear.absmax_offset", "linear.bias"}
    fresh = LinearWithLoRA(LinearNF4(96, 80), 8, 16)
    fresh.load_state_dict(state)
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), qlora(x))
    moved = copy.deepcopy(qlora).to("meta")
    assert all(t.is_meta for t in [*moved.buffers(), *moved.parameters()])
    with pytest.raises(RuntimeError, match="must stay float32"):
        copy.deepcopy(qlora).to(torch.bfloat16)(x.bfloat16())


# ---------------------------------------------------------------- QLoRA in a model


def qlora_classifier(seed: int = 123) -> GPTModel:
    model = tiny_model(seed=seed)
    model.out_head = nn.Linear(model.cfg.emb_dim, N_CLASSES)
    prepare_for_method(model, "qlora", QLORA)
    return model


def test_training_lowers_the_loss_and_changes_only_a_b_and_the_head():
    model = qlora_classifier()
    assert all(isinstance(layer.linear, LinearNF4) for layer in lora_layers(model).values())
    assert len(lora_layers(model)) == 12
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    idx, labels = token_ids(batch=8, n_tokens=10), torch.tensor([0, 1] * 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(idx)[:, -1], labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # 4-bit state bit-identical
    changed = {k for k, v in model.named_parameters() if not torch.equal(params[k], v)}
    assert changed == {k for k in params if k.endswith((".lora.A", ".lora.B")) or k.startswith("out_head.")}


def test_counts_merge_refusal_and_config_checks():
    model, full = qlora_classifier(), tiny_model()
    full.out_head = nn.Linear(full.cfg.emb_dim, N_CLASSES)
    prepare_for_method(full, "lora", CLASSIFIER_LORA)
    qlora_counts = parameter_summary(model, verbose=False)
    lora_counts = parameter_summary(full, verbose=False)
    assert (qlora_counts.trainable, qlora_counts.total, qlora_counts.base, qlora_counts.lora) == (
        lora_counts.trainable, lora_counts.total, lora_counts.base, lora_counts.lora)
    assert qlora_counts.quantized == 2 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * (4 * 64 + 256 + 64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="load the base model in full precision"):
        merge_lora(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was merged
    with pytest.raises(ValueError, match="quantize_base must be None"):
        LoRAConfig(quantize_base="nf8")
    with pytest.raises(ValueError, match="DoRA"):
        LoRAConfig(quantize_base="nf4", use_dora=True)


def test_an_adapter_trained_on_a_4_bit_base_is_an_ordinary_lora_adapter(tmp_path: Path):
    model = qlora_classifier()
    randomize_lora(model)
    path = save_lora(model, tmp_path / "qlora.safetensors", QLORA)
    assert set(load_file(path)) == set(lora_state_dict(model, QLORA))  # A, B and the head only
    idx = token_ids()
    # Into a full-precision base: plain nn.Linear layers under LoRA, the same A and B.
    full = tiny_model()
    full.out_head = nn.Linear(full.cfg.emb_dim, N_CLASSES)
    assert load_lora(full, path).quantize_base == "nf4"
    assert all(type(layer.linear) is nn.Linear for layer in lora_layers(full).values())
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(full, QLORA).values(),
                                                 lora_state_dict(model, QLORA).values(), strict=True))
    # Into a 4-bit base made from the same weights: exactly the trained model's outputs.
    quantized = tiny_model()
    quantized.out_head = nn.Linear(quantized.cfg.emb_dim, N_CLASSES)
    for block in quantized.blocks:
        nf4.quantize_linears(block)
    load_lora(quantized, path)
    with torch.no_grad():
        assert torch.equal(quantized(idx), model(idx))
        quantization_effect = (full(idx) - model(idx)).abs().max()
    print(f"the same adapter on the float32 base: max |logit difference| {quantization_effect:.3f}")
    assert quantization_effect > 0  # the 4-bit base is not the float32 one


def test_peft_export_of_a_qlora_adapter_is_that_of_the_same_lora_adapter(tmp_path: Path):
    config = dataclasses.replace(QLORA, target_modules=("W_query", "fc2"), modules_to_save=())
    model = tiny_model()
    prepare_for_method(model, "qlora", config)
    randomize_lora(model)
    full = tiny_model()
    prepare_for_method(full, "lora", dataclasses.replace(config, quantize_base=None))
    full.load_state_dict(model.state_dict(), strict=False)  # the LoRA tensors (the bases differ in kind)
    ours, reference = save_peft_adapter(model, tmp_path / "q", config), save_peft_adapter(
        full, tmp_path / "f", dataclasses.replace(config, quantize_base=None))
    written = json.loads((ours / "adapter_config.json").read_text())
    assert written == json.loads((reference / "adapter_config.json").read_text())
    assert not any("quant" in key for key in written)  # PEFT is not told the base was 4-bit
    tensors, expected = load_file(ours / "adapter_model.safetensors"), load_file(
        reference / "adapter_model.safetensors")
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        model = tiny_model(drop_rate=0.1)
        model.out_head = nn.Linear(model.cfg.emb_dim, N_CLASSES)
        prepare_for_method(model, "qlora", QLORA)
        model.checkpointing = checkpointing
        model.train()
        torch.manual_seed(5)  # the same dropout masks
        loss = model(token_ids()).logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(grads, grads_ckpt, strict=True))


def test_checkpointed_backward_does_not_recompute_the_4_bit_product_that_ends_a_block(monkeypatch):
    """Backward recomputes a block's forward pass only as far as the last tensor it saved: each 4-bit layer
    is dequantized for the recomputation and again for its input's gradient, but the feed-forward's second
    layer, whose output nothing saves (no dropout), for its input's gradient only, and the first block's
    query, key and value, whose input (the frozen embeddings, normalized) needs no gradient, for the
    recomputation only."""
    model = tiny_model(head=True)
    prepare_for_method(model, "qlora", QLORA)
    model.checkpointing = True
    model.train()
    names = {module: name for name, module in model.named_modules() if isinstance(module, LinearNF4)}
    dequantized = []
    dequantize = LinearNF4.dequantize

    def counted(self, dtype=torch.float32):
        dequantized.append(names[self])
        return dequantize(self, dtype)

    monkeypatch.setattr(LinearNF4, "dequantize", counted)
    loss = model(token_ids()).logsumexp(-1).mean()
    assert sorted(dequantized) == sorted(names.values())  # forward: each layer once
    dequantized.clear()
    loss.backward()
    once = ("ff.fc2.linear", "blocks.0.att.W_query.linear", "blocks.0.att.W_key.linear",
            "blocks.0.att.W_value.linear")
    expected = {name: 1 if name.endswith(once) else 2 for name in names.values()}
    assert {name: dequantized.count(name) for name in names.values()} == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_4_bit_state_and_the_training_step_match_the_cpu():
    qlora, _ = qlora_and_reference()
    on_gpu = copy.deepcopy(qlora).to("cuda")
    assert all(t.is_cuda for t in [*on_gpu.buffers(), *on_gpu.parameters()])
    assert torch.equal(on_gpu.linear.dequantize().cpu(), qlora.linear.dequantize())  # the same arithmetic
    weight = random_weight((96, 80), 0.02)  # quantized on the GPU: the same codes and scales
    on_cpu = nf4.quantize_nf4(weight)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(nf4.quantize_nf4(weight.cuda()), on_cpu, strict=True))
    x = torch.randn(4, 96)
    for layer, inputs in ((qlora, x), (on_gpu, x.cuda())):
        layer(inputs).square().sum().backward()
    assert torch.allclose(on_gpu.lora.B.grad.cpu(), qlora.lora.B.grad, atol=1e-5)

