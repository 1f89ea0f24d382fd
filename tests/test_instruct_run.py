"""The instruct command end to end in quick mode: a run folder through the run layer, responses written and
scored offline, the response loss learned, `respond`, the export to PEFT for GPT2LMHeadModel, the judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

from llm_scratch import instruct as instruct_module
from llm_scratch.cli import main
from llm_scratch.data.instruction import InstructionSplits, load_instruction_splits
from llm_scratch.instruct import InstructSettings, instruct, load_instruct_run, read_responses
from llm_scratch.run_record import read_record


@pytest.fixture(scope="module")
def quick_full_run(tmp_path_factory) -> tuple[Path, dict]:
    """A quick full fine-tuning run on instructions (the tiny random model, the quick subset)."""
    out = tmp_path_factory.mktemp("instruct") / "full"
    metrics = instruct(InstructSettings(quick=True, method="full", out=out, progress=False, device="cpu"))
    return out, metrics


def test_a_quick_run_learns_the_responses_and_writes_a_complete_folder(quick_full_run):
    out, metrics = quick_full_run
    assert sorted(p.name for p in out.iterdir()) == ["base_tiny.safetensors", "loss.png", "metrics.json",
                                                   "responses.json", "run.json", "weights.safetensors"]
    before, after = metrics["test_response_loss_before"], metrics["test_response_loss"]
    assert abs(before - torch.log(torch.tensor(50_257.0)).item()) < 0.5  # it starts as a uniform guess
    assert after < 0.5 * before, (before, after)
    test = load_instruction_splits(quick=True).test
    responses = read_responses(out)
    assert [(r["instruction"], r["input"], r["reference"]) for r in responses] == [
        (e.instruction, e.input, e.output) for e in test]
    scores = metrics["test_scores"]
    assert scores["n"] == len(test) == 20 and 0.0 <= scores["rouge_l_f1"] <= 1.0
    assert scores["ended_with_eos"] == sum(r["ended_with_eos"] for r in responses)
    record = read_record(out, "instruct")
    assert (record.method, record.quick, record.settings["mask_prompt"]) == ("full", True, False)


def test_respond_answers_with_the_runs_model(quick_full_run, capsys):
    out, _ = quick_full_run
    model, record = load_instruct_run(out)
    assert record.command == "instruct" and not model.training
    first = read_responses(out)[0]
    assert main(["respond", "--run", str(out), "--input", first["input"], first["instruction"]]) == 0
    assert capsys.readouterr().out == first["response"] + "\n"  # the same greedy answer as the run's
    assert main(["respond", "--run", str(out), "   "]) == 2
    assert "the instruction is empty" in capsys.readouterr().err


def test_a_lora_run_with_masked_prompts_exports_to_peft_for_gpt2lmheadmodel(tmp_path, capsys, monkeypatch):
    splits = load_instruction_splits(quick=True)
    few = InstructionSplits(splits.train[:16], splits.validation[:4], splits.test[:4])  # an epoch of 8 steps
    monkeypatch.setattr(instruct_module, "load_instruction_splits", lambda *args, **options: few)
    run = tmp_path / "lora"
    assert main(["instruct", "--quick", "--epochs", "1", "--mask-prompt", "--lr-schedule", "cosine", "--out",
                 str(run), "--no-progress"]) == 0
    settings = read_record(run, "instruct").settings
    assert settings["mask_prompt"] is True and settings["lr_schedule"] == "cosine"  # quick default: constant
    rates = json.loads((run / "metrics.json").read_text())["history"]["step_lr"]
    assert rates[0] == settings["lr"] and rates[-1] == pytest.approx(settings["lr"] / 10)
    out = tmp_path / "lora-hf"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(out / "base"), out).eval()
    ours, _ = load_instruct_run(run)
    ids = torch.randint(0, 50_257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (hf(ids).logits - ours(ids)).abs().max().item()
    assert difference < 1e-5, difference
    lora_b = ours.blocks[0].att.W_query.lora.B
    assert lora_b.abs().sum() > 0  # one epoch moved the adapter: the comparison is not of two bases


def test_a_judge_that_is_absent_stops_the_run_before_it_trains(tmp_path, capsys):
    out = tmp_path / "judged"
    assert main(["instruct", "--quick", "--out", str(out), "--judge-url", "http://127.0.0.1:9",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no judge server answers at http://127.0.0.1:9/api/chat"), err
    assert err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("arguments, message", [
    (["--method", "full", "--rank", "4"],
     "method 'full' has none of; use them with method lora, dora or qlora"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a whole number >= 1"),
    (["--judge-model", "mistral"], "--judge-model names the judge at --judge-url"),
    (["--model-name", "gpt2-small"], "quick mode always trains the 'tiny' model"),
])
def test_instruct_options_that_cannot_be_honoured_are_refused(capsys, tmp_path, arguments, message):
    assert main(["instruct", "--quick", "--out", str(tmp_path / "x"), *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # argparse: a method instruct does not have
        main(["instruct", "--method", "last-block"])
    assert "invalid choice: 'last-block'" in capsys.readouterr().err


def test_instruct_runs_default_to_folders_of_their_own():
    """`instruct` without --out never lands in a classification run's default folder (runs/lora)."""
    from llm_scratch.finetune import FinetuneSettings

    for method in ("lora", "full"):
        instruct_run = InstructSettings(quick=True, method=method, device="cpu").resolved()
        finetune_run = FinetuneSettings(quick=True, method=method, device="cpu").resolved()
        assert instruct_run.out == Path(f"runs/instruct-{method}")
        assert finetune_run.out == Path(f"runs/{method}")
