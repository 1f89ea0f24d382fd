"""The main job from the shell, end to end in quick mode (no network)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from llm_scratch.classifier import format_accuracy
from llm_scratch.cli import build_parser, main
from llm_scratch.finetune import FinetuneSettings
from llm_scratch.lora import LoRAConfig
from llm_scratch.pretrain import PretrainSettings


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "LLM_SCRATCH_DATA": str(cwd / "data")}
    env.pop("LLM_SCRATCH_QUICK", None)  # --quick alone must be enough
    return subprocess.run([sys.executable, "-m", "llm_scratch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_quick_lora_finetune_then_classify(tmp_path):
    run = tmp_path / "runs" / "lora"
    result = run_cli("finetune", "--method", "lora", "--quick", "--out", str(run), "--no-progress",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("metrics.json", "run.json", "loss.png", "accuracy.png", "adapter.safetensors"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["quick"]
    assert metrics["train_accuracy"] >= 0.75  # a tiny random model on 350 real messages; guessing: 50%
    for split, size in [("train", 350), ("validation", 50), ("test", 100)]:  # the shipped subset's splits
        low, high = metrics[f"{split}_accuracy_interval"]
        assert metrics[f"{split}_examples"] == size and low <= metrics[f"{split}_accuracy"] <= high
        assert f"{split} {format_accuracy(metrics[f'{split}_accuracy'], size)}" in result.stdout
    assert metrics["trainable_parameters"] < 0.05 * metrics["base_parameters"]
    assert metrics["saved_file_mb"] < 1.0 and metrics["train_time_s"] > 0
    losses = metrics["history"]["step_loss"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    # quick mode's schedule: from lr down a cosine to lr / 10 at the last step
    rates, lr = metrics["history"]["step_lr"], metrics["settings"]["lr"]
    assert metrics["settings"]["lr_schedule"] == "cosine" and len(rates) == len(losses)
    assert rates[0] == lr and rates[-1] == pytest.approx(lr / 10) and rates == sorted(rates, reverse=True)

    spam, ham = "Last chance! Claim your guaranteed £250 voucher. Txt CLAIM to 80080", "See you at lunch?"
    result = run_cli("classify", "--run", str(run), spam, ham, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] in {"ham", "spam"} and lines[0].endswith(spam)


def test_quick_compare_writes_a_table_and_a_chart(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SCRATCH_DATA", str(tmp_path / "data"))
    out = tmp_path / "compare"
    args = ["finetune", "--compare", "--quick", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    table = (out / "comparison.md").read_text()
    for method in ("full", "last-block", "lora"):
        assert f"| {method} |" in table
        test = json.loads((out / method / "metrics.json").read_text())
        assert format_accuracy(test["test_accuracy"], test["test_examples"]) in table  # with its interval
        assert (out / method / "metrics.json").is_file()
    assert (out / "comparison.png").is_file()
    sizes = {m: json.loads((out / m / "metrics.json").read_text())["trainable_parameters"]
             for m in ("full", "last-block", "lora")}
    assert sizes["lora"] < sizes["last-block"] < sizes["full"]


def test_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["classify", "--run", str(tmp_path / "nothing"), "hello"]) == 2
    assert "run.json not found" in capsys.readouterr().err


def test_unknown_method_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--method", "adapter"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'adapter'" in capsys.readouterr().err


def test_options_left_out_keep_the_library_defaults_and_given_ones_are_honoured(tmp_path):
    parse = build_parser().parse_args
    options = {k: v for k, v in vars(parse(["finetune"])).items() if k != "command"}
    assert FinetuneSettings.from_options(**options) == FinetuneSettings()  # defaults live in the dataclass
    schedules = [FinetuneSettings(quick=q, device="cpu").resolved().lr_schedule for q in (False, True)]
    assert schedules == ["constant", "cosine"]  # full mode's measured runs kept their constant rate

    given = ["finetune", "--method", "dora", "--model-name", "gpt2-medium", "--epochs", "1", "--lr", "1e-3",
             "--lr-schedule", "cosine", "--rank", "4", "--alpha", "8", "--batch-size", "2", "--seed", "7",
             "--eval-every", "3",
             "--data-path", str(tmp_path / "sms"), "--weights-path", str(tmp_path / "w.safetensors"),
             "--out", str(tmp_path / "run"), "--overwrite", "--bucket", "--quick", "--no-progress",
             "--device", "cpu", "--precision", "bf16"]
    options = {k: v for k, v in vars(parse(given)).items() if k not in ("command", "compare")}
    settings = FinetuneSettings.from_options(**options)
    assert settings == FinetuneSettings(
        method="dora", model_name="gpt2-medium", epochs=1, lr=1e-3, lr_schedule="cosine", batch_size=2,
        seed=7, eval_every=3, lora_config=LoRAConfig(rank=4, alpha=8.0, modules_to_save=("out_head",)),
        data_path=tmp_path / "sms", weights_path=tmp_path / "w.safetensors", out=tmp_path / "run",
        overwrite=True, bucket=True, quick=True, progress=False, device="cpu", precision="bf16")
    # --random-init, left out above, contradicts --weights-path (refused, see tests/test_bad_input.py)
    assert FinetuneSettings.from_options(random_init=True).random_init


def test_pretrain_options_left_out_keep_the_library_defaults_and_given_ones_are_honoured(tmp_path):
    parse = build_parser().parse_args
    options = {k: v for k, v in vars(parse(["pretrain"])).items() if k != "command"}
    assert PretrainSettings(**options) == PretrainSettings()  # every default is written once: the dataclass

    given = ["pretrain", "--data-path", str(tmp_path / "story.txt"), "--model-name", "gpt2-small", "--epochs",
             "3", "--context-length", "128", "--stride", "64", "--batch-size", "4", "--lr", "1e-4", "--seed",
             "7", "--device", "cpu", "--out", str(tmp_path / "run"), "--overwrite", "--quick", "--eval-every",
             "2", "--sample-prompt", "Once upon a time", "--no-progress", "--precision", "fp16"]
    options = {k: v for k, v in vars(parse(given)).items() if k != "command"}
    assert PretrainSettings(**options) == PretrainSettings(
        data_path=tmp_path / "story.txt", model_name="gpt2-small", epochs=3, context_length=128, stride=64,
        batch_size=4, lr=1e-4, seed=7, device="cpu", out=tmp_path / "run", overwrite=True, quick=True,
        eval_every=2,
        sample_prompt="Once upon a time", progress=False, precision="fp16")
    fields = {field.name for field in dataclasses.fields(PretrainSettings)}
    assert set(options) == fields  # one option per field


def test_pretrain_errors_are_explained(tmp_path, capsys):
    assert main(["pretrain", "--data-path", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    assert "no text file at" in capsys.readouterr().err
