"""The package's shape: imports run one way, modules stay small, one module reads the environment."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm_scratch"
# Each module may import only modules of a lower level: data flows text -> tokens -> model -> training -> run.
LEVELS = {
    "config": 0, "files": 0, "tokenizer": 0, "precision": 0, "lora_config": 0,
    "attention": 1, "nf4": 1,
    "model": 2, "checkpoint": 2, "plots": 2, "data": 2, "dora": 2,
    "generate": 3, "pretrained": 3, "lora": 3, "training": 3, "frozen_prefix": 3,
    "adapters": 4, "classifier": 4, "run_folder": 4, "loraplus": 4, "methods": 4, "language_model": 4,
    "finetune": 5, "peft_format": 5, "pretrain": 5,
    "cli": 6,
    "__main__": 7, "__init__": 7,
}


def node_of(path: Path) -> str:
    """The module a file belongs to; the `data` package counts as one node."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def package_imports(path: Path) -> set[str]:
    """The llm_scratch modules that the file imports (first name after `llm_scratch.`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm_scratch"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from llm_scratch import model, GPTModel, ...: names that are modules count
                found |= {alias.name for alias in node.names if alias.name in LEVELS}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith("llm_scratch.")}
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_level():
    assert {node_of(path) for path in MODULES} == set(LEVELS)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_imports_run_one_way(path: Path):
    here = node_of(path)
    upward = sorted(name for name in package_imports(path) - {here} if LEVELS[name] >= LEVELS[here])
    assert not upward, f"{path.relative_to(ROOT)} (level {LEVELS[here]}) imports {upward}, not below it"


def test_the_training_loop_knows_nothing_of_what_it_trains():
    assert package_imports(PACKAGE / "training.py") <= {"config", "model", "precision"}


def test_modules_stay_small():
    lines = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in MODULES}
    assert lines["cli.py"] < 100, "cli.py parses arguments only; the work belongs in finetune.py"
    too_long = {name: n for name, n in lines.items() if n > 350}
    assert not too_long, f"split these modules by job: {too_long}"


def test_only_config_reads_the_environment():
    readers = [str(path.relative_to(ROOT)) for path in MODULES
               if "os.environ" in path.read_text() or "getenv" in path.read_text()]
    assert readers == ["llm_scratch/config.py"]


def test_notebooks_never_import_the_cli():
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        code = "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]
                         if cell["cell_type"] == "code")
        assert "llm_scratch.cli" not in code and "os.environ" not in code, path.name
