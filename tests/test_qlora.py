"""QLoRA as a fine-tuning method: `finetune --method qlora` trains LoRA on a 4-bit base, and the run loads
back onto the same 4-bit base."""

from __future__ import annotations

from llm_scratch.classifier import evaluate_classifier
from llm_scratch.cli import main
from llm_scratch.data import load_spam_splits, spam_dataloaders
from llm_scratch.finetune import FinetuneSettings, finetune, load_run
from llm_scratch.lora import lora_layers
from llm_scratch.nf4 import LinearNF4
from llm_scratch.run_record import read_record


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
