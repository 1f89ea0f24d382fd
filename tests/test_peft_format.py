"""Adapters in PEFT's format: ours loaded by PEFT onto Hugging Face GPT-2 (language model and classifier),
PEFT's loaded here, both with the same logits; the round trip is exact; what cannot be exported is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_lora import N_CLASSES, hf_and_ours, token_ids
from torch import nn

from llm_scratch.adapters import lora_state_dict
from llm_scratch.lora import LoRAConfig, lora_layers, mark_only_lora_trainable, replace_linear_with_lora
from llm_scratch.model import GPTModel
from llm_scratch.peft_format import load_peft_adapter, save_peft_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = {"all": ("all",), "q, v and fc2": ("W_query", "W_value", "fc2")}


def hf_classifier(folder: Path):
    """Hugging Face's GPT-2 classifier on the base weights saved in `folder` (its head is random)."""
    return transformers.GPT2ForSequenceClassification.from_pretrained(
        folder, num_labels=N_CLASSES, pad_token_id=50256).eval()


def logits_of(model: nn.Module, idx: torch.Tensor, classifier: bool) -> torch.Tensor:
    """(batch, classes) at the last token (no padding here), or (batch, n_tokens, vocab); ours or PEFT's."""
    if not isinstance(model, GPTModel):
        return model(input_ids=idx).logits  # Hugging Face's classifier reads the last token itself
    logits = model(idx)
    return logits[:, -1, :] if classifier else logits


def train_a_few_steps(model: nn.Module, classifier: bool, steps: int = 3) -> None:
    """AdamW on the trainable parameters: next-token loss, or the class of the last token."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx, labels = token_ids(batch=4, n_tokens=12), torch.tensor([0, 1, 1, 0])
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        if classifier:
            loss = F.cross_entropy(logits_of(model, idx, True), labels)
        else:
            logits = logits_of(model, idx, False)[:, :-1]  # (batch, n_tokens - 1, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        optimizer.step()
    model.eval()


CASES = [("language model", "all", False, False), ("language model", "q, v and fc2", True, False),
         ("classifier", "all", True, False), ("classifier", "q, v and fc2", False, True)]


@pytest.mark.parametrize(("task", "targets", "use_dora", "use_rslora"), CASES,
                         ids=[f"{c[0]}, {c[1]}, {'dora' if c[2] else 'lora'}{', rslora' if c[3] else ''}"
                              for c in CASES])
def test_our_adapter_loads_in_peft_with_the_same_logits(task, targets, use_dora, use_rslora, tmp_path: Path):
    classifier = task == "classifier"
    hf, ours = hf_and_ours(tmp_path / "base")
    if classifier:
        hf = hf_classifier(tmp_path / "base")
        ours.out_head = nn.Linear(64, N_CLASSES, bias=False)  # as Hugging Face's score
    config = LoRAConfig(rank=4, alpha=8, use_dora=use_dora, use_rslora=use_rslora,
                        target_modules=TARGETS[targets], modules_to_save=("out_head",) if classifier else ())
    replace_linear_with_lora(ours, config)
    mark_only_lora_trainable(ours, config)
    train_a_few_steps(ours, classifier)
    folder = save_peft_adapter(ours, tmp_path / "adapter", config)

    peft_model = peft.PeftModel.from_pretrained(hf, folder).eval()
    check = peft_model.load_adapter(folder, adapter_name="check")  # the same file again, to see the report
    assert check.missing_keys == [] and check.unexpected_keys == []
    peft_model.save_pretrained(tmp_path / "resaved", selected_adapters=["default"])  # PEFT's own names
    assert set(load_file(tmp_path / "resaved" / "adapter_model.safetensors")) == set(
        load_file(folder / "adapter_model.safetensors"))
    idx = token_ids(n_tokens=16)
    with torch.no_grad():
        expected = logits_of(ours, idx, classifier)
        got = logits_of(peft_model, idx, classifier)
        with peft_model.disable_adapter():
            without = logits_of(peft_model, idx, classifier)
    difference = (got - expected).abs().max().item()
    print(f"ours -> PEFT ({task}, {targets}, DoRA {use_dora}): max |logit difference| {difference:.1e}")
    assert difference < 1e-5
    if not classifier:  # the adapter really changed the model (a classifier's random head always does)
        assert (got - without).abs().max() > 1e-3

    # Back again: the adapter PEFT loaded gives our tensors exactly, and the same layers.
    fresh = hf_and_ours(tmp_path / "base2")[1]
    if classifier:
        fresh.out_head = nn.Linear(64, N_CLASSES, bias=False)
    loaded = load_peft_adapter(fresh, folder)
    assert (loaded.rank, loaded.alpha, loaded.use_dora, loaded.use_rslora) == (4, 8, use_dora, use_rslora)
    assert list(lora_layers(fresh)) == list(lora_layers(ours))
    before, after = lora_state_dict(ours, config), lora_state_dict(fresh, loaded)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("task", ["language model", "classifier"])
def test_a_peft_trained_adapter_loads_here_with_the_same_logits(task, use_dora, tmp_path: Path):
    classifier = task == "classifier"
    hf, ours = hf_and_ours(tmp_path / "base")
    if classifier:
        hf = hf_classifier(tmp_path / "base")
        ours.out_head = nn.Linear(64, N_CLASSES, bias=False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                             use_dora=use_dora, fan_in_fan_out=True,
                             modules_to_save=["score"] if classifier else None)
    peft_model = peft.get_peft_model(hf, config)
    train_a_few_steps(peft_model, classifier)
    peft_model.save_pretrained(tmp_path / "adapter")

    loaded = load_peft_adapter(ours, tmp_path / "adapter")
    assert (loaded.rank, loaded.alpha, loaded.use_dora) == (4, 8, use_dora)
    assert len(lora_layers(ours)) == 12 and loaded.modules_to_save == (("out_head",) if classifier else ())
    assert all(layer.lora.B.any() for layer in lora_layers(ours).values())  # PEFT's training moved every B
    idx = token_ids(n_tokens=16)
    with torch.no_grad():
        expected = logits_of(peft_model, idx, classifier)
        difference = (logits_of(ours, idx, classifier) - expected).abs().max().item()
    print(f"PEFT -> ours ({task}, DoRA {use_dora}): max |logit difference| {difference:.1e}")
    assert difference < 1e-5


def test_the_config_gives_c_attn_rank_3r_and_the_same_scaling(tmp_path: Path):
    _, ours = hf_and_ours(tmp_path / "base")
    config = LoRAConfig(rank=4, alpha=8, use_rslora=True, target_modules=("attention",))
    replace_linear_with_lora(ours, config)
    folder = save_peft_adapter(ours, tmp_path / "a", config)
    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["target_modules"] == ["attn.c_attn", "attn.c_proj"] and written["r"] == 4
    assert written["rank_pattern"] == {"c_attn": 12}
    # rsLoRA: alpha / sqrt(rank) stays 8 / 2 = 4 at rank 12 with alpha 8 sqrt(3)
    assert written["alpha_pattern"]["c_attn"] / math.sqrt(12) == pytest.approx(4.0, rel=1e-12)
    peft_config = peft.LoraConfig.from_pretrained(tmp_path / "a")
    assert peft_config.use_rslora and not peft_config.use_dora and peft_config.fan_in_fan_out


def test_what_cannot_be_exported_or_imported_is_refused(tmp_path: Path):
    _, ours = hf_and_ours(tmp_path / "base")
    ours.out_head = nn.Linear(64, N_CLASSES)  # with a bias, as add_classification_head makes it
    config = LoRAConfig(rank=4, alpha=8, modules_to_save=("out_head",))
    replace_linear_with_lora(ours, config)
    with pytest.raises(ValueError, match=r"has a bias.*bias=False"):
        save_peft_adapter(ours, tmp_path / "a", config)
    with pytest.raises(ValueError, match=r"modules_to_save=\['final_norm'\] has no counterpart"):
        save_peft_adapter(ours, tmp_path / "a", LoRAConfig(rank=4, alpha=8, modules_to_save=("final_norm",)))
    _, lm = hf_and_ours(tmp_path / "base2")
    lm.out_head = nn.Linear(64, N_CLASSES, bias=False)
    head_lora = LoRAConfig(rank=4, alpha=8, target_modules=("out_head",))
    replace_linear_with_lora(lm, head_lora)
    with pytest.raises(ValueError, match=r"LoRA on \['out_head'\] has no counterpart"):
        save_peft_adapter(lm, tmp_path / "a", head_lora)
    assert not (tmp_path / "a").exists()

    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_adapter(hf_and_ours(tmp_path / "base3")[1], tmp_path / "nothing")
    # A PEFT adapter whose layers have two ranks cannot be one LoRAConfig.
    hf, fresh = hf_and_ours(tmp_path / "base4")
    mixed = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["c_proj", "c_fc"],
                                                    rank_pattern={"c_fc": 8}, fan_in_fan_out=True))
    mixed.save_pretrained(tmp_path / "mixed")
    with pytest.raises(ValueError, match=r"ranks \[4, 8\]; one LoRAConfig holds one rank"):
        load_peft_adapter(fresh, tmp_path / "mixed")
    # Into a model with fewer blocks.
    small = hf_and_ours(tmp_path / "base5", n_layer=1)[1]
    with pytest.raises(ValueError, match=r"transformer.h.1.*which this model's blocks do not have"):
        load_peft_adapter(small, tmp_path / "mixed")
    other = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    (tmp_path / "mixed" / "adapter_config.json").write_text(json.dumps({**other, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match=r"settings \['peft_type'\] are not supported"):
        load_peft_adapter(fresh, tmp_path / "mixed")
    assert not lora_layers(fresh) and not lora_layers(small)  # the refusals changed nothing
