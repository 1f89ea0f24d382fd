"""The package's shape: imports run one way, modules stay small, one module reads the environment."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm_scratch"
# Each module may import only modules of a lower level: data flows text -> tokens -> model -> training -> run.
LEVELS = {
    "config": 0, "files": 0, "tokenizer": 0, "precision": 0, "scores": 0, "judge": 0, "lora_config": 0,
    "attention": 1, "run_folder": 1, "nf4": 1,
    "model": 2, "checkpoint": 2, "plots": 2, "data": 2, "dora": 2,
    "generate": 3, "pretrained": 3, "lora": 3, "optimizer": 3, "frozen_prefix": 3,
    "training": 4,
    "adapters": 4, "loraplus": 4, "methods": 4, "run_record": 4,
    "classifier": 5, "language_model": 5, "peft_format": 5,
    "responses": 6, "run_settings": 6,
    "finetune": 7, "pretrain": 7, "instruct": 7,
    "compare": 8, "export": 8,
    "cli": 9,
    "__main__": 10, "__init__": 10,
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
    assert package_imports(PACKAGE / "training.py") <= {"config", "files", "model", "optimizer", "precision"}


def test_modules_stay_small():
    lines = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in MODULES}
    assert lines["cli.py"] < 150, "cli.py parses arguments only; the work belongs in the modules it calls"
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


def test_no_function_is_longer_than_60_lines():
    """A function a student reads in one screen; a longer one is split where a name explains the piece."""
    long = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > 60:
                    long[f"{path.relative_to(PACKAGE)}:{node.name}"] = node.end_lineno - start + 1
    assert not long, f"split these functions (lines): {long}"


def mentions_in_code(path: Path, text: str) -> bool:
    """Does the module's code (its docstrings aside) hold a string containing `text`, or a name `text`?"""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if text in node.value:
                return True
        if isinstance(node, ast.Name) and node.id == text:
            return True
        if isinstance(node, ast.alias) and node.name == text:
            return True
    return False


def test_only_the_run_layer_reads_or_writes_run_json():
    """run.json is the RunRecord's file: one module writes it, reads it and names it."""
    naming = [str(path.relative_to(PACKAGE)) for path in MODULES
              if mentions_in_code(path, "run.json") or mentions_in_code(path, "RUN_FILE")]
    assert naming == ["run_record.py"], naming


FILE_NAME = re.compile(r"[\w.-]+\.(json|safetensors|png|txt|md|tsv|lock|zip|csv|bin|pt)")


def file_name_constants(path: Path) -> list[tuple[str, str]]:
    """(constant, file name) of each module-level string constant that names a file: X = "a.json", or
    X, Y = "a.png", "b.png"."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.Assign):
            continue
        target = node.targets[0]
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
        for name, value in zip(names, values, strict=False):
            if isinstance(name, ast.Name) and isinstance(value, ast.Constant) and \
                    isinstance(value.value, str) and FILE_NAME.fullmatch(value.value):
                found.append((name.id, value.value))
    return found


def test_each_file_name_is_defined_once():
    """A file name ("metrics.json") lives in one module, under one constant; one constant name never names
    two different files in two modules."""
    places: dict[str, list[str]] = {}
    files_of_name: dict[str, set[str]] = {}
    for path in MODULES:
        for name, file_name in file_name_constants(path):
            places.setdefault(file_name, []).append(f"{path.relative_to(PACKAGE)}:{name}")
            files_of_name.setdefault(name, set()).add(file_name)
    assert "metrics.json" in places, "the test no longer finds the file-name constants"
    twice = {file_name: where for file_name, where in places.items() if len(where) > 1}
    assert not twice, f"file names defined in more than one place: {twice}"
    ambiguous = {name: files for name, files in files_of_name.items() if len(files) > 1}
    assert not ambiguous, f"one constant name for several files: {ambiguous}"
