"""The benchmark scripts run (tiny shapes, a few steps); the real tables are made by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as a script: the scripts import each other
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_finetune_smoke(capsys, monkeypatch):
    results = load_script("bench_finetune", monkeypatch).main(["--smoke"])
    table = capsys.readouterr().out
    assert "| ours full / HF full (step time) |" in table and "| length-bucketed batches |" in table
    assert set(results["step_s"]) == {"ours full", "hf full", "ours lora", "hf+peft lora"}
    assert all(seconds > 0 for seconds in results["step_s"].values())
    assert results["peak_mb"]["ours lora"] < results["peak_mb"]["ours full"]
    fixed, dynamic, bucketed = results["epoch_tokens"].values()
    assert bucketed <= dynamic < fixed  # less padding, fewer tokens computed
