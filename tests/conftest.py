"""Shared test helpers."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch

# One thread per test process, and per process a test starts: the tests' models are small, one thread is as
# fast as two for them, `make test` runs two processes side by side on two cores (pytest -n 2), and a thread
# that waits for another one descheduled by a busy machine stalls the whole matrix product. It also makes
# forking this process safe (tests/test_faults.py): no thread pool is running to be copied half-way.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def benchmark_script(monkeypatch: pytest.MonkeyPatch):
    """`benchmark_script(name)`: the module benchmarks/NAME.py, loaded as when run as a script (the
    benchmarks folder on the path, where the scripts find each other and `common`)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every attempt to open a network connection fail at once, as on an offline laptop."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) and its bytes: equal snapshots, unchanged folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def snapshot():
    """`snapshot(folder)`: every file under the folder and its bytes (see `folder_bytes`)."""
    return folder_bytes


@pytest.fixture(scope="session")
def messages() -> list[str]:
    """Messages the run-folder tests classify; their exact probabilities tell two runs apart."""
    return [
        "Congratulations! You have won a free cruise. Call 0800 123 456 now to claim",
        "Are we still on for dinner tonight?",
        "URGENT: your mobile number has been awarded a £2000 prize. Txt WIN to 80086",
        "ok see you at 7 then",
        "Free entry in a weekly competition to win FA Cup final tickets. Text FA to 87121",
        "Can you pick up some milk on the way home",
    ]


@pytest.fixture(scope="session")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Complete quick-mode runs made once per session: LoRA with seeds 1 and 2, and last-block with seed 1.

    Tests copy them (`shutil.copytree`) before changing anything.
    """
    from llm_scratch.finetune import FinetuneSettings, finetune

    folder = tmp_path_factory.mktemp("quick_runs")
    runs = {"lora": dict(method="lora", seed=1), "lora-seed2": dict(method="lora", seed=2, epochs=2),
            "last-block": dict(method="last-block", seed=1, epochs=2)}
    for name, settings in runs.items():
        finetune(FinetuneSettings(quick=True, out=folder / name, progress=False, device="cpu", **settings))
    return {name: folder / name for name in runs}
