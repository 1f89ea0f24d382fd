"""QLoRA as a fine-tuning method: `finetune --method qlora` trains LoRA on a 4-bit base, and the run loads
back onto the same 4-bit base."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from llm_scratch.classifier import evaluate_classifier
from llm_scratch.cli import main
from llm_scratch.config import PRESETS, QUICK_PRESET
from llm_scratch.data import load_spam_splits, spam_dataloaders
from llm_scratch.finetune import FinetuneSettings, finetune, load_run
from llm_scratch.lora import LoRAConfig, lora_layers, replace_linear_with_lora
from llm_scratch.model import GPTModel
from llm_scratch.nf4 import LinearNF4, quantize_linears
from llm_scratch.pretrained import load_gpt2, save_gpt2_safetensors
from llm_scratch.run_record import BaseModel, load_base, read_record
from llm_scratch.run_settings import write_quick_base_model


def test_a_quick_qlora_run_trains_on_a_4_bit_base_and_loads_back_to_the_same_accuracy(tmp_path, capsys):

    out = tmp_path / "qlora"
    metrics = finetune(FinetuneSettings(method="qlora", quick=True, epochs=2, out=out, progress=False,
                                        device="cpu"))
    record = read_record(out, "finetune")
    assert record.lora_config.quantize_base == "nf4" and record.settings["checkpointing"] is True
    assert metrics["history"]["step_loss"][-1] < metrics["history"]["step_loss"][0]
    model, _ = load_run(out)  # the adapter on the same 4-bit base: the run's accuracy, exactly
    assert all(isinstance(layer.linear, LinearNF4) for layer in lora_layers(model).values())
    loaders = spam_dataloaders(load_spam_splits(quick=True, seed=123), max_length=record.max_length)
    assert evaluate_classifier(model, loaders.test)["accuracy"] == metrics["test_accuracy"]
    assert main(["classify", "--run", str(out), "WIN a prize now"]) == 0
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "adapter_model.safetensors").is_file()  # an ordinary LoRA adapter
    capsys.readouterr()
    assert main(["finetune", "--quick", "--method", "lora", "--out", str(tmp_path / "x"), "--no-progress",
                 "--checkpointing"]) == 0  # honoured for any method
    assert read_record(tmp_path / "x", "finetune").settings["checkpointing"] is True


def _equal_tensors(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    """The same parameter and buffer names, each bit for bit the same tensor."""
    ours, theirs = model.state_dict(), reference.state_dict()
    return list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_4_bit_base_loads_block_by_block_exactly_as_quantized_afterwards(tmp_path):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS[QUICK_PRESET], n_layers=3)
    path = save_gpt2_safetensors(GPTModel(cfg), tmp_path / "model.safetensors")
    attention = [f"blocks.{i}.att.{name}" for i in range(3) for name in ("W_query", "W_key", "W_value",
                                                                        "out_proj")]
    loaded = load_gpt2(weights_path=path, nf4_layers=attention)
    afterwards = load_gpt2(weights_path=path)
    quantize_linears(afterwards, attention)
    assert _equal_tensors(loaded, afterwards)
    assert isinstance(loaded.blocks[2].att.out_proj, LinearNF4)
    assert isinstance(loaded.blocks[2].ff.fc1, nn.Linear)
    assert loaded.out_head.weight is loaded.tok_emb.weight  # still tied
    for wrong in (["out_head"], ["blocks.0.att"], ["blocks.9.ff.fc1"]):
        with pytest.raises(ValueError, match="not Linear layers of the blocks"):
            load_gpt2(weights_path=path, nf4_layers=wrong)

    # A run's base, from a file or a seeded random init: the layers its QLoRA config targets come out 4-bit.
    qlora = LoRAConfig(target_modules=("attention",), quantize_base="nf4")
    write_quick_base_model(tmp_path / "tiny.safetensors", seed=1)
    for base in (BaseModel("file", QUICK_PRESET, "", path="tiny.safetensors"),
                 BaseModel("random", QUICK_PRESET, "", seed=1)):
        model = load_base(base, tmp_path, torch.device("cpu"), command="finetune", verify=False,
                          lora_config=qlora)
        reference = load_base(base, tmp_path, torch.device("cpu"), command="finetune", verify=False)
        replace_linear_with_lora(reference, qlora)  # quantizing after loading, as LoRA's swap does
        replace_linear_with_lora(model, qlora)  # wraps the 4-bit layers as they are
        for layers in (lora_layers(model), lora_layers(reference)):
            torch.manual_seed(2)  # the same random A matrices in both
            for layer in layers.values():
                torch.nn.init.normal_(layer.lora.A)
        assert _equal_tensors(model, reference), base.kind
