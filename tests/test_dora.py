"""DoRA: the formula, its start, merging, counts, adapter files, agreement with PEFT (outputs, gradients,
dropout), and `--method dora` from the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_lora import N_CLASSES, peft_and_ours, tiny_model, token_ids
from torch import nn

from llm_scratch.adapters import load_lora, read_lora_metadata, save_lora
from llm_scratch.cli import main
from llm_scratch.config import GPTConfig
from llm_scratch.lora import (
    LinearWithLoRA,
    LoRAConfig,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    parameter_summary,
    replace_linear_with_lora,
)
from llm_scratch.model import GPTModel

DORA = LoRAConfig(rank=4, alpha=8, use_dora=True, modules_to_save=("out_head",))


def randomize_dora(model: nn.Module, seed: int = 7) -> None:
    """Non-zero B and magnitudes away from ||W||, so that both parts of DoRA change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=generator) * 0.05)
            m = layer.magnitude.m
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=generator))


def test_one_layer_by_hand():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    layer = LinearWithLoRA(linear, rank=4, alpha=8, use_dora=True)
    W, b = linear.weight.detach(), linear.bias.detach()  # (16, 32), (16,)
    torch.testing.assert_close(layer.magnitude.m, W.norm(dim=1))  # m starts as the row norms of W
    with torch.no_grad():
        layer.lora.B.normal_()
        layer.magnitude.m.mul_(torch.linspace(0.5, 1.5, 16))
    A, B, m = layer.lora.A.detach(), layer.lora.B.detach(), layer.magnitude.m.detach()
    V = W + 2.0 * (A @ B).T  # (16, 32): the direction, scaling alpha / rank = 2
    x = torch.randn(3, 5, 32)
    expected = x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + b  # (3, 5, 16)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # Without a bias the same formula holds with b = 0.
    no_bias = LinearWithLoRA(nn.Linear(32, 16, bias=False), rank=4, alpha=8, use_dora=True)
    with torch.no_grad():
        no_bias.lora.B.normal_()
    V = no_bias.linear.weight + 2.0 * (no_bias.lora.A @ no_bias.lora.B).T
    expected = x @ (no_bias.magnitude.m[:, None] * V / V.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(no_bias(x), expected.detach(), rtol=1e-5, atol=1e-5)


def test_output_is_unchanged_at_init():
    base = tiny_model(head=True)
    model = copy.deepcopy(base)
    replace_linear_with_lora(model, DORA)
    idx = token_ids()
    with torch.no_grad():
        difference = (model(idx) - base(idx)).abs().max().item()
    print(f"DoRA at init vs the base model: max |logit difference| {difference:.1e}")
    assert difference < 1e-6  # B = 0 and m = ||W||: the scale m / ||W|| is exactly 1


def test_gradients_and_training_dropout_match_peft(tmp_path: Path):
    """Same weights, A, B, m: PEFT and we agree on the gradients (so on which norm is held constant) and, in
    training mode, on where dropout acts (the same random draws on both sides)."""
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # only LoRA's dropout draws
    hf_lora, ours, pairs = peft_and_ours(tmp_path, use_dora=True, dropout=0.3, **no_dropout)
    hf_lora.train()
    ours.train()
    idx = token_ids(n_tokens=16)
    outputs = []
    for run in (lambda: hf_lora(input_ids=idx).logits, lambda: ours(idx)):
        torch.manual_seed(5)
        logits = run()
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()  # any loss
        outputs.append(logits.detach())
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5
    worst = 0.0  # the largest relative difference of a gradient, ||ours - PEFT's|| / ||PEFT's||
    for peft_layer, layer in pairs:
        grads = [(peft_layer.lora_A["default"].weight.grad.T, layer.lora.A.grad),
                 (peft_layer.lora_B["default"].weight.grad.T, layer.lora.B.grad),
                 (peft_layer.lora_magnitude_vector["default"].weight.grad, layer.magnitude.m.grad)]
        worst = max(worst, *((got - expected).norm() / expected.norm() for expected, got in grads))
    print(f"DoRA vs PEFT, training mode with dropout: gradients differ by at most {worst:.1e} (relative)")
    assert worst < 1e-5  # float32 rounding; with the norm in the backward pass it would be about 0.6
    # Dropout really acted: the same weights in eval mode give other logits.
    with torch.no_grad():
        assert (ours.eval()(idx) - outputs[1]).abs().max() > 1e-3


def test_merge_unmerge_and_merge_lora():
    model = tiny_model(head=True)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    replace_linear_with_lora(model, DORA)
    randomize_dora(model)
    idx = token_ids()
    layers = lora_layers(model)
    with torch.no_grad():
        unmerged = model(idx)
        for layer in layers.values():
            layer.merge()
            layer.merge()  # a second merge changes nothing
        assert (model(idx) - unmerged).abs().max() < 1e-5
        for layer in layers.values():  # each merged row has length m
            torch.testing.assert_close(layer.linear.weight.norm(dim=1), layer.magnitude.m)
            layer.unmerge()
            layer.unmerge()
        for name, layer in layers.items():
            assert (layer.linear.weight - base_weights[f"{name}.weight"]).abs().max() < 1e-6
        assert (model(idx) - unmerged).abs().max() < 1e-5
        merge_lora(model)
        assert not lora_layers(model)
        assert (model(idx) - unmerged).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="not merged"):
        LinearWithLoRA(nn.Linear(4, 4), rank=2, alpha=2, use_dora=True).magnitude.unmerged_weight(
            nn.Linear(4, 4), None)


def test_exact_counts_gpt2_small_with_a_two_class_head(capsys):
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset("gpt2-small"))
        model.out_head = nn.Linear(768, N_CLASSES)
    config = LoRAConfig(rank=16, alpha=16, use_dora=True, modules_to_save=("out_head",))
    replace_linear_with_lora(model, config)
    mark_only_lora_trainable(model, config)
    summary = parameter_summary(model)
    # 12 blocks x (4 x 768 + 3072 + 768) = 82,944 magnitudes: one per output feature of each wrapped layer.
    assert (summary.lora, summary.magnitude, summary.trainable - summary.lora - summary.magnitude) == (
        2_654_208, 82_944, 1_538)
    assert summary.trainable == 2_738_690 and summary.base == 124_441_346
    assert capsys.readouterr().out.strip() == "trainable 2,738,690 of 124,441,346 (2.20%)"


def test_training_changes_a_b_m_and_the_head_only():
    model = tiny_model(head=True)
    replace_linear_with_lora(model, DORA)
    mark_only_lora_trainable(model, DORA)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before
                         if ".lora." in n or ".magnitude." in n or n.startswith("out_head.")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx, labels = token_ids(batch=4), torch.tensor([0, 1, 1, 0])
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(idx)[:, -1, :], labels).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) is (name not in trainable), name


def test_save_then_load_gives_identical_outputs(tmp_path: Path):
    model = tiny_model(head=True)
    replace_linear_with_lora(model, DORA)
    randomize_dora(model)
    path = save_lora(model, tmp_path / "dora.safetensors", DORA, model_name="tiny")
    assert read_lora_metadata(path)["lora_config"] == DORA
    fresh = tiny_model(head=True)
    with torch.no_grad():
        fresh.out_head.weight.zero_()
    assert load_lora(fresh, path, model_name="tiny") == DORA
    assert all(layer.magnitude is not None for layer in lora_layers(fresh).values())
    idx = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))
    # Plain LoRA layers cannot take a DoRA adapter (and the other way round).
    plain = tiny_model(head=True)
    replace_linear_with_lora(plain, LoRAConfig(rank=4, alpha=8))
    with pytest.raises(ValueError, match="DoRA=False, but the config says .*DoRA=True"):
        load_lora(plain, path)


def test_dora_from_the_command_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_SCRATCH_DATA", str(tmp_path / "data"))
    run = tmp_path / "dora"
    assert main(["finetune", "--method", "dora", "--quick", "--out", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    saved = json.loads((run / "run.json").read_text())
    assert metrics["method"] == saved["method"] == "dora" and saved["lora_config"]["use_dora"] is True
    assert metrics["settings"]["loraplus_lr_ratio"] is None
    assert metrics["settings"]["lr"] == 5e-3  # quick mode's rate, as for lora
    # The tiny preset: 2 blocks x (4 x 64 + 256 + 64) = 1,152 magnitudes more than LoRA's count.
    lora = 2 * 16 * (4 * (64 + 64) + (64 + 256) + (256 + 64))
    assert metrics["trainable_parameters"] == lora + 1_152 + 64 * 2  # + the head (2 x 64, no bias)
    losses = metrics["history"]["step_loss"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert read_lora_metadata(run / "adapter.safetensors")["lora_config"].use_dora
    capsys.readouterr()
    assert main(["classify", "--run", str(run), "WIN a FREE prize now", "See you at lunch?"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] in {"ham", "spam"}
