"""Faults while a run writes its folder: kill -9, Ctrl-C, a full disk, a file-size limit, a folder that cannot
be written, two runs at once, a closed pipe. After each, the run folder holds the old run or the new one,
whole, or is refused; and the command ends with one line, never a traceback.
"""

from __future__ import annotations

import collections
import errno
import glob
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.figure
import pytest

from llm_scratch import files
from llm_scratch.cli import main
from llm_scratch.data.text import load_text
from llm_scratch.finetune import classify_with_run
from llm_scratch.run_record import checked_file, read_record, record_path


def environment(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "LLM_SCRATCH_DATA": str(tmp_path / "cache")}
    env.pop("LLM_SCRATCH_QUICK", None)
    return env


def start(tmp_path: Path, *args, **popen) -> subprocess.Popen:
    """`python -m llm_scratch ARGS` in a new process, its output captured as text."""
    return subprocess.Popen([sys.executable, "-m", "llm_scratch", *map(str, args)], env=environment(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def new_run(out: Path, epochs: int = 1) -> list[str]:
    """The re-run that the fault tests interrupt: quick LoRA, seed 2, into an existing run folder."""
    return ["finetune", "--quick", "--seed", "2", "--epochs", str(epochs), "--out", str(out), "--overwrite",
            "--no-progress"]


@pytest.fixture
def old_run(quick_runs, tmp_path) -> Path:
    """A good run folder (quick LoRA, seed 1) at tmp_path/runs/lora."""
    return shutil.copytree(quick_runs["lora"], tmp_path / "runs" / "lora")


def fork_cli(tmp_path: Path, *args) -> multiprocessing.Process:
    """`python -m llm_scratch ARGS` in a forked copy of this process, its output discarded: the same command
    without Python's start-up and imports (seconds each), so that a kill falls within the run itself."""
    process = multiprocessing.get_context("fork").Process(
        target=_cli_in_child, args=(environment(tmp_path), [str(arg) for arg in args]))
    process.start()
    return process


def _cli_in_child(env: dict[str, str], argv: list[str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os._exit(main(argv))  # no cleanup of the parent's state: this process only ever runs the command


def staging_folders(out: Path) -> set[str]:
    """The temporary folders of runs into `out` (the one being written, and those killed runs left)."""
    return set(glob.glob(f"{glob.escape(str(out.parent))}/.{out.name}.partial-*"))


def staging_names(out: Path, stale: set[str]) -> list[str]:
    """What the temporary folder of the run in progress holds now (`stale`: folders of earlier runs)."""
    return sorted(Path(p).name for folder in staging_folders(out) - stale
                  for p in glob.glob(f"{glob.escape(folder)}/*") + glob.glob(f"{glob.escape(folder)}/.*"))


def wait_for_saving(process: multiprocessing.Process, out: Path, stale: set[str], saving_starts: str) -> None:
    """Wait until the run into `out` has begun saving (its file `saving_starts` is staged) or has ended."""
    while process.is_alive() and saving_starts not in staging_names(out, stale):
        time.sleep(0.002)


def moment(staged: list[str], running: bool, replaced: bool, saving_starts: str) -> str:
    """When a kill struck, from what the run's temporary folder held and what the run folder holds after;
    `saving_starts`: the first file the run writes once training is over."""
    if not running:
        return "after the process had ended"
    if not staged:
        return "after the move into place" if replaced else "before the run wrote anything"
    if saving_starts not in staged:
        return "while training"
    return "while saving its files"


def kill_at_random_moments(tmp_path: Path, old_run: Path, args_for, n_kills: int, saving_starts: str,
                           which_run, seed: int = 20240607) -> collections.Counter:
    """Run `args_for(out)` once into tmp_path/reference (to time it and its saving), then start it over
    `old_run` and SIGKILL it, `n_kills` times: every other time at a random moment of the whole run, else at a
    random moment of its saving (from when its first file after training, `saving_starts`, appears, within
    the time the reference run's saving took). After each kill, `which_run(old_run)` says "old" or "new"
    (whole) or raises; the old run is put back whenever the new one completed. Returns the outcomes by
    moment."""
    pristine = shutil.copytree(old_run, tmp_path / "pristine")
    began = time.perf_counter()
    reference = fork_cli(tmp_path, *args_for(tmp_path / "reference"))
    wait_for_saving(reference, tmp_path / "reference", set(), saving_starts)
    saving_began = time.perf_counter()
    reference.join(timeout=300)
    duration, saving = time.perf_counter() - began, time.perf_counter() - saving_began
    assert reference.exitcode == 0
    rng = random.Random(seed)
    outcomes: collections.Counter = collections.Counter()
    for kill in range(n_kills):
        if which_run(old_run) == "new":  # the last re-run completed: start again from the old run
            shutil.rmtree(old_run)
            shutil.copytree(pristine, old_run)
        stale = staging_folders(old_run)  # left by the last kill; the run removes them once it holds the lock
        process = fork_cli(tmp_path, *args_for(old_run))
        if kill % 2 == 0:  # any moment of the whole run
            time.sleep(rng.uniform(0.0, duration))
        else:  # during the saves, which took `saving` seconds in the reference run
            wait_for_saving(process, old_run, stale, saving_starts)
            time.sleep(rng.uniform(0.0, 0.9 * saving))
        staged, running = staging_names(old_run, stale), process.is_alive()
        process.kill()
        process.join()
        try:
            outcome = which_run(old_run)
        except (ValueError, FileNotFoundError) as error:
            assert str(old_run) in str(error)  # a clear refusal that names the folder or its file
            outcome = f"refused: {str(error)[:60]}"
        outcomes[(moment(staged, running, outcome == "new", saving_starts), outcome)] += 1
    print(f"\n{n_kills} kills (-9); a whole run takes {duration:.1f} s here:")
    for (when, outcome), count in sorted(outcomes.items()):
        print(f"  {count:2d} x killed {when}: {outcome}")
    return outcomes


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_the_old_finetune_run_or_the_new_one(old_run, tmp_path, messages):
    """24 kills (-9) of a fine-tuning re-run; after each, classify gives exactly the predictions of the run
    that run.json names (by its seed), or refuses."""
    expected = {1: classify_with_run(old_run, messages)}

    def which_run(folder: Path) -> str:
        seed = json.loads(record_path(folder).read_text())["settings"]["seed"]
        if seed not in expected:  # the re-run's: the reference run, made first, gives its predictions
            expected[seed] = classify_with_run(tmp_path / "reference", messages)
        assert classify_with_run(folder, messages) == expected[seed], f"the folder claims seed {seed}"
        return "old" if seed == 1 else "new"

    outcomes = kill_at_random_moments(tmp_path, old_run, new_run, 24, "adapter.safetensors", which_run)
    print(f"24 kills: {dict(outcomes)}")  # (when it was killed, what the folder held): times
    expected.setdefault(2, classify_with_run(tmp_path / "reference", messages))
    assert expected[1] != expected[2]  # the two runs are told apart by their predictions
    assert sum(outcomes.values()) == 24
    assert sum(n for (when, _), n in outcomes.items() if when == "while saving its files") >= 5
    final = fork_cli(tmp_path, *new_run(old_run))
    final.join(timeout=300)
    assert final.exitcode == 0 and classify_with_run(old_run, messages) == expected[2]
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["lora"]  # no temporary folder, no lock left


@pytest.fixture
def short_story(tmp_path) -> Path:
    """The story's first 3,000 characters: a pretraining run of a few steps, saving the files a whole run
    saves."""
    path = tmp_path / "short_story.txt"
    path.write_text(load_text()[:3000], encoding="utf-8")
    return path


@pytest.fixture
def old_pretraining_run(tmp_path, short_story) -> Path:
    """A good quick pretraining run (seed 1, one epoch of the short story) at tmp_path/runs/pretrain."""
    out = tmp_path / "runs" / "pretrain"
    assert main(["pretrain", "--quick", "--epochs", "1", "--seed", "1", "--data-path", str(short_story),
                 "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_the_old_pretraining_run_or_the_new_one(
        snapshot, tmp_path, short_story, old_pretraining_run):
    """20 kills (-9) of `pretrain --overwrite` over a good run: each time the folder holds the old run byte
    for byte, or the new one whole (every file the reference re-run wrote, the same bytes where the run is
    deterministic, the record's checksums right), never a mix."""
    old = snapshot(old_pretraining_run)

    def args_for(out: Path) -> list:
        return ["pretrain", "--quick", "--epochs", "1", "--seed", "2", "--data-path", short_story,
                "--no-progress", "--out", out, "--overwrite"]

    def which_run(folder: Path) -> str:
        files = snapshot(folder)
        if files == old:
            return "old"
        new = snapshot(tmp_path / "reference")
        assert files.keys() == new.keys(), sorted(files)
        for name in ("model.safetensors", "config.json", "samples.txt"):
            assert files[name] == new[name], name
        record = read_record(folder, "pretrain")
        for name in record.files:
            checked_file(folder, record, name, "a file of the run")
        assert json.loads(files["metrics.json"])["settings"]["seed"] == record.settings["seed"] == 2
        return "new"

    outcomes = kill_at_random_moments(tmp_path, old_pretraining_run, args_for, 20, "model.safetensors",
                                      which_run)
    print(f"20 kills: {dict(outcomes)}")  # (when it was killed, what the folder held): times
    assert sum(outcomes.values()) == 20 and not any(o.startswith("refused") for _, o in outcomes)
    assert sum(n for (when, _), n in outcomes.items() if when == "while saving its files") >= 5


def test_ctrl_c_during_training_prints_one_line_exits_130_and_changes_nothing(snapshot, old_run, tmp_path):
    before = snapshot(old_run.parent)
    # As in a terminal: Ctrl-C's signal is handled. (A job started in the background by a script inherits it
    # ignored, and Python then raises no KeyboardInterrupt.)
    process = start(tmp_path, *new_run(old_run, epochs=50),
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "trainable" in process.stdout.readline()  # training has begun
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err == ("error: interrupted (Ctrl-C): the run in progress changed no run folder and left no file "
                   "half-written\n")
    assert snapshot(old_run.parent) == before


def test_a_file_size_limit_while_saving_ends_in_one_line_and_changes_nothing(snapshot, old_run, tmp_path):
    def limit_file_size() -> None:  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB: the base model is 13 MB

    before = snapshot(old_run.parent)
    process = start(tmp_path, *new_run(old_run), preexec_fn=limit_file_size)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "File too large; the file is larger than this system allows (a file-size limit" in err
    assert snapshot(old_run.parent) == before


@pytest.mark.parametrize("where", ["safetensors", "figure"])
def test_a_full_disk_while_saving_ends_in_one_line_and_changes_nothing(snapshot, old_run, monkeypatch, capsys,
                                                                      where):
    def disk_full(*args, **kwargs):  # save_file(tensors, path, ...) or Figure.savefig(figure, path, ...)
        path = args[1]
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if where == "safetensors":
        monkeypatch.setattr(files, "save_file", disk_full)
    else:
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    before = snapshot(old_run.parent)
    assert main(new_run(old_run)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "No space left on device; the disk is full: free some space" in err
    assert snapshot(old_run.parent) == before


def test_out_naming_a_file_is_refused(snapshot, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(new_run(tmp_path / "notes.txt")) == 2
    assert "notes.txt is a file, not a folder; choose another run folder (--out)" in capsys.readouterr().err
    assert snapshot(tmp_path) == {"notes.txt": b"keep me"}


def test_out_under_a_file_is_one_line_naming_the_path(snapshot, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(new_run(tmp_path / "notes.txt" / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'notes.txt'}") and "a file is in the way" in err
    assert snapshot(tmp_path) == {"notes.txt": b"keep me"}


def test_a_read_only_folder_is_one_line_naming_the_path(snapshot, old_run, monkeypatch, capsys):
    before = snapshot(old_run.parent)
    if os.geteuid() == 0:  # root writes into read-only folders: the operating system's refusal is simulated
        def refuse(*args, dir=None, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    else:
        old_run.parent.chmod(0o555)
    try:
        assert main(new_run(old_run)) == 2
    finally:
        old_run.parent.chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith(f"error: {old_run.parent}") and err.count("\n") == 1
    assert "Permission denied; no permission: choose a folder you can write to" in err
    assert snapshot(old_run.parent) == before


def test_a_cache_folder_that_is_a_file_matters_only_when_a_download_is_needed(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("LLM_SCRATCH_DATA", str(cache))
    assert main(["finetune", "--quick", "--out", str(tmp_path / "quick"), "--no-progress"]) == 0
    assert main(["finetune", "--out", str(tmp_path / "full"), "--no-progress"]) == 2  # needs the download
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cache}") and err.count("\n") == 1, err
    assert "a file is in the way where a folder is needed: move it, or choose another path" in err
    assert not (tmp_path / "full").exists() and cache.read_text() == "not a folder"


def test_two_runs_into_one_folder_at_once_the_second_is_refused(old_run, tmp_path, messages):
    first = start(tmp_path, *new_run(old_run, epochs=2))
    assert "trainable" in first.stdout.readline()  # the first run holds the folder's lock
    first.send_signal(signal.SIGSTOP)  # and keeps holding it, paused, however slowly the second one starts
    try:
        second = start(tmp_path, *new_run(old_run))
        _, err = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert err == (f"error: another run is writing into {old_run} right now (it holds the lock "
                   f"{old_run.parent / '.lora.lock'}); wait until it ends, or choose another run folder "
                   "(--out)\n")
    first.communicate(timeout=300)
    assert first.returncode == 0
    run = json.loads(record_path(old_run).read_text())
    metrics = json.loads((old_run / "metrics.json").read_text())
    assert (run["settings"]["seed"], metrics["settings"]["epochs"]) == (2, 2)  # the first run's, whole
    assert len(classify_with_run(old_run, messages)) == len(messages)


def test_a_closed_pipe_ends_classify_quietly(old_run, tmp_path):
    process = start(tmp_path, "classify", "--run", old_run, "hello", "WIN a prize", "see you")
    process.stdout.close()  # the reader is gone, as with `| head -1` once it has its line
    err = process.stderr.read()
    assert process.wait(timeout=120) == 141 and err == ""
