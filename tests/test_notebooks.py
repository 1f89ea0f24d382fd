"""The notebooks: named in teaching order, committed without outputs, quick mode read through the package;
and each one runs top to bottom in quick mode, as a student would. Their times are measured by
`benchmarks/bench_notebooks.py`, never asserted here."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

# The benchmark holds the one way to run a notebook in quick mode; it imports neither torch nor the package.
_spec = importlib.util.spec_from_file_location(
    "bench_notebooks", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_notebooks.py")
bench_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_notebooks)

NOTEBOOK_DIR, NOTEBOOKS = bench_notebooks.NOTEBOOK_DIR, bench_notebooks.NOTEBOOKS
NAME = re.compile(r"(\d\d)_[a-z0-9]+(_[a-z0-9]+)*\.ipynb")  # 01_gpt_from_scratch.ipynb
ids = [path.name for path in NOTEBOOKS]


def code_cells(path: Path) -> list:
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def python_of(cell) -> ast.Module:
    """The cell's code as Python, IPython's magics (%matplotlib ...) turned into calls first."""
    return ast.parse(TransformerManager().transform_cell(cell.source))


def test_notebooks_are_numbered_in_teaching_order():
    names = [path.name for path in NOTEBOOKS]
    assert names, f"no notebooks found in {NOTEBOOK_DIR}"
    badly_named = [name for name in names if not NAME.fullmatch(name)]
    assert not badly_named, f"name notebooks NN_words_in_lower_case.ipynb: {badly_named}"
    numbers = [int(NAME.fullmatch(name).group(1)) for name in names]
    assert numbers == list(range(1, len(names) + 1)), (
        f"number the notebooks 01, 02, ... in teaching order, each number once, no gaps: {names}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)  # raises ValidationError on a notebook Jupyter could not open
    executed = [index for index, cell in enumerate(notebook.cells)
                if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not executed, (f"{path.name}: cells {executed} hold outputs or execution counts; clear them: "
                          f"`jupyter nbconvert --clear-output --inplace notebooks/{path.name}`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_settings_cell_reads_quick_mode_through_the_package(path: Path):
    cells = code_cells(path)
    tagged = [index for index, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    assert tagged == [0], f"{path.name}: the first code cell, and only it, must be tagged `parameters`"

    settings = {node.targets[0].id: node.value for node in python_of(cells[0]).body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    for name, function in {"QUICK": "quick_mode", "DEVICE": "pick_device"}.items():
        value = settings.get(name)
        called = isinstance(value, ast.Call) and ast.unparse(value.func) == function
        assert called, f"{path.name}: the settings cell must set {name} = {function}(...)"
    assert isinstance(settings.get("SEED"), ast.Constant), f"{path.name}: the settings cell must set SEED"

    for index, cell in enumerate(cells):  # one reading of LLM_SCRATCH_QUICK, the package's: "1", "true", ...
        strings = {node.value for node in ast.walk(python_of(cell)) if isinstance(node, ast.Constant)}
        assert "LLM_SCRATCH_QUICK" not in strings, (
            f"{path.name}, code cell {index}: read quick mode with quick_mode(), not from the environment")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_in_quick_mode(path: Path, tmp_path: Path):
    seconds = bench_notebooks.run_notebook_quick(path, tmp_path)  # raises CellExecutionError on any error
    print(f"{path.name}: {seconds:.1f} s in quick mode")
