"""LoRA: the layer, injection, freezing, counts, merging, adapter files, and agreement with PEFT."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from llm_scratch.adapters import load_lora, lora_state_dict, read_lora_metadata, save_lora
from llm_scratch.config import GPTConfig
from llm_scratch.lora import (
    LinearWithLoRA,
    LoRAConfig,
    LoRALayer,
    freeze,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    parameter_summary,
    replace_linear_with_lora,
)
from llm_scratch.model import GPTModel

N_CLASSES = 2


def tiny_model(seed: int = 123, head: bool = False, **overrides) -> GPTModel:
    """The tiny preset with random weights; `head=True` swaps in a 2-class head, as the classifier does."""
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig.from_preset("tiny", **overrides))
    if head:
        model.out_head = nn.Linear(model.cfg.emb_dim, N_CLASSES)
    return model.eval()


def token_ids(seed: int = 0, batch: int = 2, n_tokens: int = 12) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n_tokens), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model: nn.Module, seed: int = 7, std: float = 0.05) -> None:
    """Give every B a non-zero value, so the LoRA branch actually changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=generator) * std)


# ---------------------------------------------------------------- the layer


def test_lora_layer_init_scaling_and_formula():
    torch.manual_seed(0)
    layer = LoRALayer(in_dim=256, out_dim=96, rank=8, alpha=16)
    assert layer.A.shape == (256, 8) and layer.B.shape == (8, 96)
    assert torch.count_nonzero(layer.B) == 0  # starts as a no-op
    # Kaiming-uniform with a=sqrt(5) and fan-in = in_dim: uniform on +-1/sqrt(in_dim), std = bound/sqrt(3)
    bound = 1 / math.sqrt(256)
    assert layer.A.abs().max() <= bound
    assert layer.A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert layer.scaling == 2.0  # alpha / rank
    assert LoRALayer(256, 96, rank=16, alpha=16, use_rslora=True).scaling == 4.0  # alpha / sqrt(rank)

    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 5, 256)
    expected = 2.0 * torch.einsum("bti,ir,ro->bto", x, layer.A, layer.B)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.A @ layer.B)


def test_dropout_acts_on_the_lora_branch_only():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LinearWithLoRA(base, rank=4, alpha=4, dropout=0.9).train()
    x = torch.randn(8, 32)
    assert torch.equal(layer(x), base(x))  # B = 0: with dropout on the base path this would differ
    with torch.no_grad():
        layer.lora.B.normal_()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)  # the branch is dropped out in training
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.lora.A @ layer.lora.B)


# ---------------------------------------------------------------- injection and freezing


def test_default_targets_are_every_linear_in_the_blocks_and_not_the_head():
    model = tiny_model(head=True)
    names = replace_linear_with_lora(model, LoRAConfig(rank=4, alpha=8))
    per_block = ["att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.fc1", "ff.fc2"]
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in per_block]
    assert isinstance(model.out_head, nn.Linear) and not isinstance(model.out_head, LinearWithLoRA)
    assert isinstance(model.blocks[1].ff.fc2.linear, nn.Linear)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("attention", 8),
        ("feedforward", 4),
        (["out_proj"], 2),
        (["blocks.1.ff.fc2"], 1),
        (["attention", "fc2"], 10),
        (["W_query", "W_value"], 4),
        (["out_head"], 1),  # the (untied) classification head, only when asked for by name
    ],
)
def test_target_selection(targets, expected):
    model = tiny_model(head=True)
    names = replace_linear_with_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=targets))
    assert len(names) == expected == len(lora_layers(model))


def test_output_is_unchanged_at_init():
    base = tiny_model(head=True)
    model = copy.deepcopy(base)
    replace_linear_with_lora(model, LoRAConfig(rank=8, alpha=16))
    idx = token_ids()
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))  # B = 0 exactly, so bit-identical


def test_three_steps_change_only_lora_and_the_head():
    model = tiny_model(head=True)
    config = LoRAConfig(rank=4, alpha=8, modules_to_save=("out_head",))
    replace_linear_with_lora(model, config)
    mark_only_lora_trainable(model, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".lora." in n or n.startswith("out_head.")}

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx, labels = token_ids(batch=4), torch.tensor([0, 1, 1, 0])
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(idx)[:, -1, :], labels)
        loss.backward()
        optimizer.step()

    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} should have been trained"
        else:
            assert torch.equal(param, before[name]), f"{name} is a base weight and must stay bit-identical"


def test_freeze_and_meta_device():
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset("tiny"))
    freeze(model)
    assert not any(p.requires_grad for p in model.parameters())
    replace_linear_with_lora(model, LoRAConfig(rank=4, alpha=4))
    layer = model.blocks[0].att.W_query.lora
    assert layer.A.is_meta and layer.B.is_meta  # made on the linear's device: no memory used


def test_exact_counts_gpt2_small_with_a_two_class_head(capsys):
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset("gpt2-small"))
        model.out_head = nn.Linear(768, N_CLASSES)
    config = LoRAConfig(rank=16, alpha=16, modules_to_save=("out_head",))
    replace_linear_with_lora(model, config)
    mark_only_lora_trainable(model, config)
    summary = parameter_summary(model)
    assert capsys.readouterr().out.strip() == "trainable 2,655,746 of 124,441,346 (2.13%)"
    # 12 blocks x (4 x 16 x (768 + 768) + 2 x 16 x (768 + 3072)) = 2,654,208 LoRA numbers, + 1,538 in the head
    assert (summary.trainable, summary.base, summary.lora) == (2_655_746, 124_441_346, 2_654_208)
    assert summary.total == 124_441_346 + 2_654_208
    # With the language-model head, the tied embedding/head tensor (50,257 x 64) counts once.
    tied = parameter_summary(GPTModel(GPTConfig.from_preset("tiny")), verbose=False)
    assert (tied.total, tied.trainable, tied.lora, str(tied)) == (
        3_332_928, 3_332_928, 0, "trainable 3,332,928 of 3,332,928 (100.00%)")


# ---------------------------------------------------------------- merging


def test_merge_unmerge_and_merge_lora():
    model = tiny_model(head=True)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    replace_linear_with_lora(model, LoRAConfig(rank=8, alpha=16))
    randomize_lora(model)
    idx = token_ids()
    with torch.no_grad():
        unmerged = model(idx)
        layers = lora_layers(model)
        for layer in layers.values():
            layer.merge()
            layer.merge()  # a second merge must not add the update twice
        merged = model(idx)
        assert (merged - unmerged).abs().max() < 1e-5

        for layer in layers.values():
            layer.unmerge()
            layer.unmerge()
        for name, layer in layers.items():
            restored = layer.linear.weight
            assert (restored - base_weights[f"{name}.weight"]).abs().max() < 1e-6

        reference = model(idx)
        names = merge_lora(model)
        assert names == list(layers)
        assert not lora_layers(model)
        assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
        assert (model(idx) - reference).abs().max() < 1e-5
        # The update really is in the weights: they moved away from the base weights.
        assert not torch.equal(model.blocks[0].ff.fc1.weight, base_weights["blocks.0.ff.fc1.weight"])


# ---------------------------------------------------------------- adapter files


def test_save_then_load_gives_identical_outputs(tmp_path: Path):
    model = tiny_model(head=True)
    config = LoRAConfig(rank=4, alpha=8, target_modules="attention", use_rslora=True,
                        modules_to_save=["out_head"])
    assert config.target_modules == ("attention",) and config.modules_to_save == ("out_head",)  # tuples
    replace_linear_with_lora(model, config)
    randomize_lora(model)
    path = save_lora(model, tmp_path / "adapter.safetensors", config, model_name="tiny")

    meta = read_lora_metadata(path)
    assert meta["lora_config"] == config and meta["model_name"] == "tiny"
    assert meta["layers"] == list(lora_layers(model))
    state = lora_state_dict(model, config)
    assert len(state) == 2 * 8 + 2  # A and B of 8 layers, the head's weight and bias

    fresh = tiny_model(head=True, seed=123)  # same base weights
    with torch.no_grad():
        fresh.out_head.weight.zero_()  # an untrained head: the adapter file must bring the trained one
    assert load_lora(fresh, path, model_name="tiny") == config
    assert list(lora_layers(fresh)) == list(lora_layers(model))
    assert all(m.lora.use_rslora and m.lora.rank == 4 for m in lora_layers(fresh).values())
    idx = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))
    # Loading again into a model that already has the layers copies the tensors in place.
    load_lora(fresh, path)
    assert len(lora_layers(fresh)) == 8

    # The adapter holds only what changed: a small fraction of the model.
    full = sum(p.numel() * p.element_size() for p in fresh.parameters())
    assert path.stat().st_size < 0.02 * full


FIXTURES = Path(__file__).parent / "fixtures"


def test_an_adapter_saved_by_llm_scratch_0_1_still_loads():
    """adapter_v1.safetensors was written by llm-scratch 0.1 (settings per layer, no LoRAConfig): tiny preset
    with torch.manual_seed(0), a 2-class head, rank-2 LoRA (alpha 4) on the attention layers, random B."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny"))
    model.out_head = nn.Linear(64, N_CLASSES)  # untrained: the adapter brings the head
    config = load_lora(model, FIXTURES / "adapter_v1.safetensors", model_name="tiny")
    assert config == LoRAConfig(rank=2, alpha=4, target_modules=tuple(lora_layers(model)),
                                modules_to_save=("out_head",))
    assert len(lora_layers(model)) == 8  # 4 attention projections x 2 blocks
    expected = load_file(str(FIXTURES / "adapter_v1_expected.safetensors"))
    with torch.no_grad():
        logits = model.eval()(expected["input_ids"])
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


def test_a_0_1_adapter_with_mixed_settings_says_how_to_convert(tmp_path: Path):
    from safetensors.torch import save_file

    layers = {"blocks.0.att.W_query": {"rank": 2, "alpha": 2.0, "use_rslora": False, "dropout": 0.0},
              "blocks.1.att.W_query": {"rank": 4, "alpha": 2.0, "use_rslora": False, "dropout": 0.0}}
    metadata = {"format": "llm-scratch-lora", "version": "1", "base_model": "tiny",
                "layers": json.dumps(layers), "also": "[]", "targets": json.dumps(list(layers))}
    save_file({"w": torch.zeros(1)}, str(tmp_path / "mixed.safetensors"), metadata)
    with pytest.raises(ValueError, match="different ranks or alphas.*Load it with llm-scratch 0.1"):
        load_lora(tiny_model(head=True), tmp_path / "mixed.safetensors")


# ---------------------------------------------------------------- error cases


def test_injection_errors():
    model = tiny_model(head=True)
    with pytest.raises(ValueError, match="no nn.Linear layer matched"):
        replace_linear_with_lora(model, LoRAConfig(rank=4, alpha=4, target_modules=["W_nothing"]))
    with pytest.raises(ValueError, match="no nn.Linear layer matched"):
        replace_linear_with_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(rank=4, alpha=4))  # no .blocks
    for rank in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            replace_linear_with_lora(model, LoRAConfig(rank=rank, alpha=4))
    for alpha in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            replace_linear_with_lora(model, LoRAConfig(rank=4, alpha=alpha))
    with pytest.raises(ValueError, match="dropout"):
        replace_linear_with_lora(model, LoRAConfig(rank=4, alpha=4, dropout=1.0))
    with pytest.raises(ValueError, match="target_modules"):
        replace_linear_with_lora(model, LoRAConfig(rank=4, alpha=4, target_modules=[]))
    with pytest.raises(ValueError, match="takes a LoRAConfig"):
        replace_linear_with_lora(model, {"rank": 4, "alpha": 4})
    assert not lora_layers(model)  # none of the failed calls changed the model

    replace_linear_with_lora(model, LoRAConfig(rank=4, alpha=4, target_modules="attention"))
    with pytest.raises(ValueError, match="already have LoRA"):
        replace_linear_with_lora(model, LoRAConfig(rank=4, alpha=4))  # "all" includes the wrapped ones
    assert len(lora_layers(model)) == 8  # the failed call wrapped nothing, not even the free fc1/fc2
    with pytest.raises(ValueError, match="already has LoRA"):
        LinearWithLoRA(model.blocks[0].att.W_query, rank=2, alpha=2)

    tied = tiny_model()
    with pytest.raises(ValueError, match="shares its weight"):
        replace_linear_with_lora(tied, LoRAConfig(rank=4, alpha=4, target_modules=["out_head"]))


def test_freezing_and_merging_errors(tmp_path: Path):
    model = tiny_model(head=True)
    config = LoRAConfig(rank=2, alpha=2)
    with pytest.raises(RuntimeError, match="no LoRA layers"):
        mark_only_lora_trainable(model, config)
    with pytest.raises(RuntimeError, match="no LoRA layers"):
        merge_lora(model)
    with pytest.raises(RuntimeError, match="no LoRA layers"):
        save_lora(model, tmp_path / "a.safetensors", config)
    replace_linear_with_lora(model, config)
    with pytest.raises(ValueError, match="no module 'classifier'"):
        mark_only_lora_trainable(model, LoRAConfig(rank=2, alpha=2, modules_to_save=("classifier",)))
    assert all(p.requires_grad for p in model.parameters())  # the failed call froze nothing
    with pytest.raises(ValueError, match="already has LoRA with rank=2.*the config says rank=4"):
        save_lora(model, tmp_path / "a.safetensors", LoRAConfig(rank=4, alpha=2))
    model.blocks[0].ff.fc1.merge()
    with pytest.raises(RuntimeError, match="merged"):
        save_lora(model, tmp_path / "a.safetensors", config)
    assert not (tmp_path / "a.safetensors").exists()


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    model = tiny_model(head=True)
    config = LoRAConfig(rank=4, alpha=8, modules_to_save=("out_head",))
    replace_linear_with_lora(model, config)
    randomize_lora(model)
    return save_lora(model, tmp_path / "adapter.safetensors", config, model_name="tiny")


def test_load_errors_missing_file_and_foreign_file(tmp_path: Path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="no LoRA adapter file"):
        load_lora(tiny_model(head=True), tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not an llm-scratch LoRA adapter"):
        load_lora(tiny_model(head=True), tmp_path / "weights.safetensors")
    header = {"format": "llm-scratch-lora", "version": "3"}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "v3.safetensors"), header)
    with pytest.raises(ValueError, match="format version '3'.*reads versions 1 and 2"):
        load_lora(tiny_model(head=True), tmp_path / "v3.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare1.safetensors"), {**header, "version": "1"})
    with pytest.raises(ValueError, match="metadata field 'layers' is missing or damaged"):
        load_lora(tiny_model(head=True), tmp_path / "bare1.safetensors")
    bad_config = {**header, "version": "2", "layers": "[]", "lora_config": '{"rank": 4, "colour": "red"}'}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bad_config.safetensors"), bad_config)
    with pytest.raises(ValueError, match="lora_config is invalid.*colour"):
        load_lora(tiny_model(head=True), tmp_path / "bad_config.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"), {**header, "version": "2"})
    with pytest.raises(ValueError, match="metadata field 'lora_config' is missing or damaged"):
        load_lora(tiny_model(head=True), tmp_path / "bare.safetensors")
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_lora(tiny_model(head=True), tmp_path / "text.safetensors")


def test_load_errors_keys_shapes_and_metadata(adapter: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    def unchanged(model: GPTModel) -> bool:
        return not lora_layers(model)

    # A model with fewer blocks: the adapter names layers this model lacks.
    model = tiny_model(head=True, n_layers=1)
    with pytest.raises(ValueError, match="'blocks.1.att.W_query' that this model lacks"):
        load_lora(model, adapter)
    assert unchanged(model)
    # A narrower model: A and B do not fit.
    model = tiny_model(head=True, emb_dim=32)
    with pytest.raises(ValueError, match=r"blocks.0.att.W_query.lora.A: the adapter has shape \(64, 4\)"):
        load_lora(model, adapter)
    assert unchanged(model)
    # The language-model head instead of the trained 2-class head.
    model = tiny_model()
    with pytest.raises(ValueError, match=r"out_head: the adapter holds .*\(2, 64\).*\(50257, 64\).*replace"):
        load_lora(model, adapter)
    assert unchanged(model)
    # The wrong base model name, when the caller asks for a check.
    with pytest.raises(ValueError, match="trained on base model 'tiny', not 'gpt2-small'"):
        load_lora(tiny_model(head=True), adapter, model_name="gpt2-small")
    # Existing LoRA layers with other settings.
    model = tiny_model(head=True)
    replace_linear_with_lora(model, LoRAConfig(rank=8, alpha=8))
    with pytest.raises(ValueError, match="already has LoRA with rank=8"):
        load_lora(model, adapter)
    # Merged layers must be unmerged first.
    model = tiny_model(head=True)
    replace_linear_with_lora(model, LoRAConfig(rank=4, alpha=8))
    model.blocks[1].att.out_proj.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        load_lora(model, adapter)
    # A damaged file: a tensor missing that its metadata promises.
    state = load_file(str(adapter))
    del state["blocks.0.ff.fc2.lora.B"]
    from safetensors import safe_open

    with safe_open(str(adapter), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(state, str(tmp_path / "damaged.safetensors"), metadata)
    with pytest.raises(ValueError, match=r"missing \['blocks.0.ff.fc2.lora.B'\]"):
        load_lora(tiny_model(head=True), tmp_path / "damaged.safetensors")
    # A module that is not a Linear where the adapter expects one.
    model = tiny_model(head=True)
    model.blocks[0].ff.fc1 = nn.Identity()
    with pytest.raises(ValueError, match="'blocks.0.ff.fc1', which is a Identity here"):
        load_lora(model, adapter)


# ---------------------------------------------------------------- against Hugging Face PEFT


# The layers that map one to one between Hugging Face's GPT-2 and ours (c_attn holds q, k, v side by side).
OURS_OF = {"attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.fc1", "mlp.c_proj": "ff.fc2"}


def hf_and_ours(tmp_path: Path, **hf_config):
    """A tiny random Hugging Face GPT2LMHeadModel and our GPTModel with the same weights (our own loader)."""
    transformers = pytest.importorskip("transformers")
    from llm_scratch.pretrained import load_gpt2

    torch.manual_seed(0)
    shape = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128, "vocab_size": 50257}
    config = transformers.GPT2Config(**{**shape, **hf_config})
    hf = transformers.GPT2LMHeadModel(config).float().eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf, load_gpt2(weights_path=tmp_path / "model.safetensors").float().eval()


def peft_and_ours(tmp_path: Path, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                  use_rslora: bool = False, use_dora: bool = False, **hf_config):
    """PEFT's LoRA (or DoRA) and ours on the same three layers of every block, with the same A, B (random,
    not zero) and DoRA magnitudes (moved away from their start, so that they matter)."""
    peft = pytest.importorskip("peft")
    hf, ours = hf_and_ours(tmp_path, **hf_config)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(OURS_OF), init_lora_weights=False,
                             fan_in_fan_out=True, use_rslora=use_rslora, use_dora=use_dora,
                             lora_dropout=dropout)
    hf_lora = peft.get_peft_model(hf, config).eval()
    ours_config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=tuple(OURS_OF.values()),
                             use_rslora=use_rslora, use_dora=use_dora)
    assert len(replace_linear_with_lora(ours, ours_config)) == 6
    pairs = []  # (PEFT's layer, ours)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in hf_lora.named_modules():
            if "default" not in getattr(module, "lora_A", {}):
                continue
            i = int(name.split(".h.")[1].split(".")[0])
            layer = ours.get_submodule(f"blocks.{i}.{OURS_OF['.'.join(name.split('.')[-2:])]}")
            assert module.scaling["default"] == layer.lora.scaling
            layer.lora.A.copy_(module.lora_A["default"].weight.T)  # PEFT (rank, in) -> ours (in, rank)
            layer.lora.B.copy_(module.lora_B["default"].weight.T)  # PEFT (out, rank) -> ours (rank, out)
            if use_dora:
                magnitude = module.lora_magnitude_vector["default"].weight  # (out,)
                magnitude.mul_(1 + 0.2 * torch.randn(magnitude.shape, generator=generator))
                layer.magnitude.m.copy_(magnitude)
            pairs.append((module, layer))
    assert len(pairs) == 6
    return hf_lora, ours, pairs


@pytest.mark.parametrize(("use_rslora", "use_dora"), [(False, False), (True, False), (False, True)],
                         ids=["lora", "rslora", "dora"])
def test_matches_peft_merged_and_unmerged(use_rslora: bool, use_dora: bool, tmp_path: Path):
    hf_lora, ours, _ = peft_and_ours(tmp_path, use_rslora=use_rslora, use_dora=use_dora)
    idx = token_ids(n_tokens=16)
    with torch.no_grad():
        expected = hf_lora(input_ids=idx).logits
        got = ours(idx)
        unmerged_diff = (got - expected).abs().max().item()
        assert unmerged_diff < 1e-5
        assert (expected - _without_adapters(hf_lora, idx)).abs().max() > 1e-3  # LoRA really changed it

        merged_hf = hf_lora.merge_and_unload()(input_ids=idx).logits
        merge_lora(ours)
        merged_diff = (ours(idx) - merged_hf).abs().max().item()
        assert merged_diff < 1e-5
    kind = "DoRA" if use_dora else "rsLoRA" if use_rslora else "LoRA"
    print(f"{kind} vs PEFT: max |logit difference| unmerged {unmerged_diff:.1e}, "
          f"merged {merged_diff:.1e}")


def _without_adapters(peft_model, idx: torch.Tensor) -> torch.Tensor:
    with peft_model.disable_adapter():
        return peft_model(input_ids=idx).logits
