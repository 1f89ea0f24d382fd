"""Quick-mode run time of each notebook, run exactly as CI runs it (a fresh kernel; its start is included).

    python benchmarks/bench_notebooks.py                                            # all, solutions too
    python benchmarks/bench_notebooks.py notebooks/05_spam_classification_lora.ipynb   # only those named

Each notebook runs top to bottom with LLM_SCRATCH_QUICK=1, no network (HF_HUB_OFFLINE=1) and its run files in
a temporary folder; its figures go where they go by default, `figures/` inside that run folder. The notebooks'
exercise solutions (`notebooks/solutions/`) run the same way. `tests/test_notebooks.py` runs them all with
`run_notebook_quick` from here and fails only on an error; the times are measured here, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SOLUTIONS = sorted((NOTEBOOK_DIR / "solutions").glob("*_solutions.ipynb"))  # the exercises' solutions
CELL_TIMEOUT_S = 600  # a limit against a cell that hangs, not a time budget


def quick_env(workdir: Path, quick: bool = True) -> dict[str, str]:
    """The environment variables of a quick-mode run: tiny model, no network, files under `workdir`, one
    thread (the tiny model gains nothing from two, and two kernels side by side then share two cores well).

    `quick=False` is the same run in full mode, for the notebooks that need no download (01, 04)."""
    return {
        "LLM_SCRATCH_QUICK": "1" if quick else "",
        "LLM_SCRATCH_FIGURES": "",  # unset: figures go to their default folder, inside the runs folder
        "LLM_SCRATCH_RUNS": str(workdir / "runs"),
        "HF_HUB_OFFLINE": "1",  # quick mode must never touch the network
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1" if quick else os.environ.get("OMP_NUM_THREADS", ""),
    }


def run_notebook_quick(path: Path, workdir: Path, quick: bool = True, runs_in_one_kernel: int = 1) -> float:
    """Execute the notebook at `path` top to bottom in quick mode in a fresh kernel, `runs_in_one_kernel`
    times in a row as "Run All" again would; return the seconds, kernel start included.

    Raises nbclient's CellExecutionError (with the cell and its traceback) on any error or cell timeout.
    `quick=False` runs it in full mode instead (no network either: for notebooks that download nothing).
    """
    notebook = nbformat.read(path, as_version=4)
    # The kernel starts in the notebook's folder; once the last cell has run it is stopped at once: an orderly
    # exit would only tear down the loaded modules, about 0.9 s of CPU per kernel with PyTorch loaded.
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}, shutdown_kernel="immediate")
    start = time.perf_counter()
    with client.setup_kernel(env={**os.environ, **quick_env(workdir, quick)}):  # the kernel's environment
        for _ in range(runs_in_one_kernel):
            for index, cell in enumerate(client.nb.cells):
                client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
    return time.perf_counter() - start


def run_notebook_as_in_class(path: Path, workdir: Path) -> list[float]:
    """What a class does to a notebook: "Run All" twice in one kernel, then once more in a fresh kernel over
    the files the first runs left (in `workdir`). The seconds of the two kernels."""
    return [run_notebook_quick(path, workdir, runs_in_one_kernel=2), run_notebook_quick(path, workdir)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the notebooks one after the other, print a markdown table; return the seconds by notebook name."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: all of them, then the solutions)")
    args = parser.parse_args(argv)
    paths = [path.resolve() for path in args.notebooks] or NOTEBOOKS + SOLUTIONS
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    # Imported here, not at the top: the test imports this module without torch or the package.
    from common import machine_description  # benchmarks/ is on the path when run as a script

    command = "python benchmarks/bench_notebooks.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    seconds = {}
    for path in paths:
        with tempfile.TemporaryDirectory(prefix="bench-notebooks-") as workdir:
            seconds[path.name] = run_notebook_quick(path, Path(workdir))
        print(f"{path.name}: {seconds[path.name]:.1f} s", file=sys.stderr, flush=True)  # progress

    print(f"\nMachine: {machine_description()}  ")
    print(f"Command: `{command.strip()}`\n")
    print("| notebook | quick-mode time |\n|---|---:|")
    for name, sec in seconds.items():
        print(f"| {name} | {sec:.1f} s |")
    return seconds


if __name__ == "__main__":
    main()
