"""The notebooks and their exercise solutions: named in teaching order, committed without outputs, a setup
check then the settings cell, quick mode read through the package, exercises answered with assertions; and
each one runs top to bottom in quick mode, as a student would, without changing a file git tracks. Their times
are measured by `benchmarks/bench_notebooks.py`, never asserted here."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

from llm_scratch import config

# The benchmark holds the one way to run a notebook in quick mode; it imports neither torch nor the package.
_spec = importlib.util.spec_from_file_location(
    "bench_notebooks", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_notebooks.py")
bench_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_notebooks)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR, NOTEBOOKS = bench_notebooks.NOTEBOOK_DIR, bench_notebooks.NOTEBOOKS
SOLUTIONS = bench_notebooks.SOLUTIONS
EVERY = NOTEBOOKS + SOLUTIONS
NAME = re.compile(r"(\d\d)_[a-z0-9]+(_[a-z0-9]+)*\.ipynb")  # 01_gpt_from_scratch.ipynb
EXERCISE = re.compile(r"^#+\s*Exercise (\d+)\b", re.MULTILINE)  # "### Exercise 2: ..." in a markdown cell
ids = [str(path.relative_to(NOTEBOOK_DIR)) for path in EVERY]


def code_cells(path: Path) -> list:
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def python_of(cell) -> ast.Module:
    """The cell's code as Python, IPython's magics (%matplotlib ...) turned into calls first."""
    return ast.parse(TransformerManager().transform_cell(cell.source))


def solutions_of(notebook: Path) -> Path:
    return NOTEBOOK_DIR / "solutions" / f"{notebook.stem}_solutions.ipynb"


def git_status() -> str | None:
    """`git status --porcelain` of the project (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def test_notebooks_are_numbered_in_teaching_order():
    names = [path.name for path in NOTEBOOKS]
    assert names, f"no notebooks found in {NOTEBOOK_DIR}"
    badly_named = [name for name in names if not NAME.fullmatch(name)]
    assert not badly_named, f"name notebooks NN_words_in_lower_case.ipynb: {badly_named}"
    numbers = [int(NAME.fullmatch(name).group(1)) for name in names]
    assert numbers == list(range(1, len(names) + 1)), (
        f"number the notebooks 01, 02, ... in teaching order, each number once, no gaps: {names}")


def test_every_notebook_has_its_solutions_and_every_solution_its_notebook():
    missing = [solutions_of(path).name for path in NOTEBOOKS if not solutions_of(path).is_file()]
    assert not missing, f"write the exercises' solutions: notebooks/solutions/{missing}"
    orphans = [path.name for path in SOLUTIONS if path not in map(solutions_of, NOTEBOOKS)]
    assert not orphans, f"solutions without a notebook of that name: {orphans}"


@pytest.mark.parametrize("path", EVERY, ids=ids)
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)  # raises ValidationError on a notebook Jupyter could not open
    executed = [index for index, cell in enumerate(notebook.cells)
                if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    relative = path.relative_to(ROOT)
    assert not executed, (f"{relative}: cells {executed} hold outputs or execution counts; clear them: "
                          f"`jupyter nbconvert --clear-output --inplace {relative}`")
    raw = json.loads(path.read_text())  # nbformat.read adds missing cell ids; the file must have them
    without_id = [index for index, cell in enumerate(raw["cells"]) if "id" not in cell]
    assert not without_id, f"{relative}: cells {without_id} have no id (nbformat 4.5 requires one)"


@pytest.mark.parametrize("path", EVERY, ids=ids)
def test_setup_check_then_settings_cell_reading_quick_mode_through_the_package(path: Path):
    cells = code_cells(path)
    setup = code_cells(NOTEBOOKS[0])[0].source
    assert 'find_spec("llm_scratch")' in setup, f"{NOTEBOOKS[0].name}: the first code cell is the setup check"
    assert cells[0].source == setup, (f"{path.name}: the first code cell must be the setup check, the same "
                                      f"as in {NOTEBOOKS[0].name}")
    tagged = [index for index, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    assert tagged == [1], f"{path.name}: the second code cell, and only it, must be tagged `parameters`"

    assignments = [(node.targets[0].id, node.value) for node in python_of(cells[1]).body
                   if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)]
    switch = [value for name, value in assignments if name == "QUICK"][:1]
    assert switch and isinstance(switch[0], ast.Constant) and switch[0].value is None, (
        f"{path.name}: the settings cell must start its QUICK setting with the switch `QUICK = None` (None "
        "follows LLM_SCRATCH_QUICK; a student sets True or False)")
    settings = dict(assignments)  # the last value of each name
    for name, function in {"QUICK": "quick_mode", "DEVICE": "pick_device"}.items():
        value = settings.get(name)
        called = isinstance(value, ast.Call) and ast.unparse(value.func) == function
        assert called, f"{path.name}: the settings cell must set {name} = {function}(...)"
    assert isinstance(settings.get("SEED"), ast.Constant), f"{path.name}: the settings cell must set SEED"

    for index, cell in enumerate(cells):  # one reading of LLM_SCRATCH_QUICK, the package's: "1", "true", ...
        strings = {node.value for node in ast.walk(python_of(cell)) if isinstance(node, ast.Constant)}
        assert "LLM_SCRATCH_QUICK" not in strings, (
            f"{path.name}, code cell {index}: read quick mode with quick_mode(), not from the environment")


def test_setup_check_says_what_to_install_when_the_package_is_missing(monkeypatch: pytest.MonkeyPatch):
    setup = code_cells(NOTEBOOKS[0])[0].source
    monkeypatch.chdir(NOTEBOOK_DIR)  # where Jupyter starts a notebook's kernel
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(setup, {})  # noqa: S102 (installed: says nothing)
    assert printed.getvalue() == ""

    monkeypatch.setitem(sys.modules, "llm_scratch", None)  # as if it were not installed
    with contextlib.redirect_stdout(printed), pytest.raises(ModuleNotFoundError, match="printed above"):
        exec(setup, {})  # noqa: S102
    message = printed.getvalue()
    for command in (f'%pip install -e "{ROOT}[notebooks]"', 'python -m pip install -e ".[notebooks]"',
                    'py -m pip install -e ".[notebooks]"', "Colab", "%pip install -e /content/", "restart"):
        assert command in message, command


def _assertions(cell) -> int:
    """How many checks a code cell makes: assert statements and calls of functions named assert..."""
    nodes = list(ast.walk(python_of(cell)))
    calls = [node for node in nodes if isinstance(node, ast.Call) and "assert" in ast.unparse(node.func)]
    return sum(isinstance(node, ast.Assert) for node in nodes) + len(calls)


def _exercises(path: Path) -> dict[int, int]:
    """Exercise number -> the assertions in the code cells under its heading (0 in the notebook itself)."""
    found: dict[int, int] = {}
    current = None
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            for number in EXERCISE.findall(cell.source):
                current = int(number)
                found[current] = 0
        elif current is not None:
            found[current] += _assertions(cell)
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_exercises_end_the_notebook_and_each_solution_asserts_its_answer(path: Path):
    asked = _exercises(path)
    assert 3 <= len(asked) <= 5 and list(asked) == list(range(1, len(asked) + 1)), (
        f"{path.name}: end with 3 to 5 exercises under headings `### Exercise 1: ...`, numbered from 1")
    answered = _exercises(solutions_of(path))
    assert list(answered) == list(asked), (f"{solutions_of(path).name}: one `## Exercise N` section per "
                                           "exercise of the notebook")
    unchecked = [number for number, checks in answered.items() if checks == 0]
    assert not unchecked, f"{solutions_of(path).name}: exercises {unchecked} assert nothing"


def test_figures_go_to_the_git_ignored_runs_folder_by_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(config.FIGURES_ENV, raising=False)
    monkeypatch.delenv(config.RUNS_ENV, raising=False)
    for folder in (NOTEBOOK_DIR, NOTEBOOK_DIR / "solutions", ROOT):  # where kernels and the shell start
        monkeypatch.chdir(folder)
        assert config.figures_dir() == ROOT / "runs" / "figures" and config.runs_dir() == ROOT / "runs"
    if git_status() is None:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "runs/figures/01_parameter_counts.png"], cwd=ROOT)
    assert ignored.returncode == 0, "runs/ must be in .gitignore: notebooks write their figures there"


@pytest.mark.parametrize("path", EVERY, ids=ids)
def test_notebook_runs_twice_in_one_kernel_then_in_a_fresh_one_and_changes_no_file_git_sees(path: Path,
                                                                                          tmp_path: Path):
    """In quick mode, as in class: "Run All" twice in one kernel, then once more in a fresh kernel over the
    runs the first left behind. Any error in any cell fails (CellExecutionError names the cell)."""
    before = git_status()
    seconds = bench_notebooks.run_notebook_as_in_class(path, tmp_path)
    print(f"{path.name}: {seconds[0]:.1f} s for two runs in one kernel, {seconds[1]:.1f} s in a fresh one")
    assert git_status() == before, f"running {path.name} changed files in the project: see `git status`"
