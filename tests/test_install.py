"""The pip path beside `make`: the extras the README tells students to install exist, they match what
`make` installs, and the project builds into a wheel that carries the data quick mode needs (no network)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib comes with Python 3.11")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    """Package names of requirement lines, without versions, extras or comments."""
    return {re.split(r"[<>=!~\[; #]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for line in requirements if line.strip() and not line.strip().startswith("#")}


def test_the_extras_the_readme_names_exist_and_match_makes_install():
    extras = PROJECT["optional-dependencies"]
    assert {"notebooks", "test"} <= set(extras)
    assert "jupyter" in names(extras["notebooks"])
    assert {"pytest", "nbclient", "transformers", "peft", "rouge-score"} <= names(extras["test"])
    # `make` installs requirements.txt: the runtime packages plus Jupyter, as `pip install -e ".[notebooks]"`.
    make_installs = names((ROOT / "requirements.txt").read_text().splitlines())
    assert make_installs == names(PROJECT["dependencies"]) | names(extras["notebooks"])

    readme = (ROOT / "README.md").read_text()
    for command in ('pip install -e ".[notebooks]"', 'pip install -e ".[test]"', "%pip install -e"):
        assert command in readme, command


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building needs setuptools")
def test_the_project_builds_a_wheel_with_quick_modes_data_and_its_credit(tmp_path: Path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "llm_scratch", source / "llm_scratch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "--wheel-dir", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("llm_scratch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        text = {name: archive.read(name).decode() for name in files if ".dist-info/" in name}
    metadata = next(content for name, content in text.items() if name.endswith("/METADATA"))
    entry_points = next(content for name, content in text.items() if name.endswith("/entry_points.txt"))
    assert {"llm_scratch/data/sms_spam_sample.tsv", "llm_scratch/data/sms_spam_sample_NOTICE.txt",
            "llm_scratch/data/instruction-data.json", "llm_scratch/data/instruction-data_NOTICE.txt",
            "llm_scratch/data/instruction-data_LICENSE-Apache-2.0.txt", "llm_scratch/cli.py"} <= files
    assert "Provides-Extra: notebooks" in metadata and "Provides-Extra: test" in metadata
    assert "llm-scratch = llm_scratch.cli:main" in entry_points
