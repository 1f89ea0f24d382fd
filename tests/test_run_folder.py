"""Run folders: written whole or not at all, one run at a time, refused when a file or a key is wrong."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llm_scratch.classifier import classify
from llm_scratch.files import explain_error, read_safetensors, require_finite, save_safetensors
from llm_scratch.finetune import classify_with_run, load_run
from llm_scratch.run_folder import check_fingerprint, fingerprint
from llm_scratch.run_record import check_out, read_record, record_path, writing_run_folder

RUN_FILE = "run.json"  # what the staging tests write; the record itself is the run layer's


def writing_run(out: Path, overwrite: bool = False):
    """The staged folder of a fine-tuning run into `out`."""
    return writing_run_folder(out, "finetune", overwrite)


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- writing_run: the folder appears whole, or nothing changes ----

def test_a_new_run_folder_appears_only_when_complete(tmp_path):
    out = tmp_path / "runs" / "lora"
    with writing_run(out) as folder:
        (folder / RUN_FILE).write_text("{}")
        assert not out.exists()  # nothing at `out` while the run writes
        assert folder.parent == out.parent and folder.name.startswith(".lora.partial-")
    assert (out / RUN_FILE).read_text() == "{}"
    assert hidden_leftovers(out.parent) == []  # neither the temporary folder nor the lock file remain


def test_an_existing_run_is_refused_without_overwrite_and_replaced_only_when_complete(tmp_path):
    out = tmp_path / "lora"
    out.mkdir()
    (out / RUN_FILE).write_text("old")
    with pytest.raises(ValueError, match=r"already holds a run; pass --overwrite"):
        with writing_run(out):
            pass
    with writing_run(out, overwrite=True) as folder:
        (folder / RUN_FILE).write_text("new")
        assert (out / RUN_FILE).read_text() == "old"  # untouched until the new run is complete
    assert (out / RUN_FILE).read_text() == "new"
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("stop", [RuntimeError("training diverged"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_run_leaves_the_old_folder_and_no_temporary_one(snapshot, tmp_path, stop):
    out = tmp_path / "lora"
    out.mkdir()
    (out / RUN_FILE).write_text("old")
    with pytest.raises(type(stop)):
        with writing_run(out, overwrite=True) as folder:
            (folder / RUN_FILE).write_text("half")
            raise stop
    assert snapshot(tmp_path) == {"lora/run.json": b"old"}


@pytest.mark.parametrize("out, message", [
    ("", "the current folder or one above it"), (".", "the current folder or one above it"),
    ("..", "the current folder or one above it"), ("a_file", "is a file, not a folder"),
    ("mixed", r"holds files a finetune run does not write \(notes.txt\)"),
])
def test_folders_that_cannot_take_a_run_are_refused_even_with_overwrite(snapshot, tmp_path, monkeypatch, out,
                                                                       message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / RUN_FILE).write_text("{}")
    (tmp_path / "mixed" / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=message):
        check_out(Path(out), True, "finetune")
    with pytest.raises(ValueError, match=message):
        with writing_run(Path(out), overwrite=True):
            pass
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("existing, command", [("finetune", "pretrain"), ("pretrain", "finetune")])
def test_a_folder_holding_another_commands_run_is_refused_even_with_overwrite(snapshot, tmp_path, existing,
                                                                              command):
    out = tmp_path / "run"
    out.mkdir()
    record_path(out).write_text(json.dumps({"command": existing}))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"holds a {existing} run, and {command} writes runs of its own"):
        with writing_run_folder(out, command, overwrite=True):
            pass
    assert snapshot(tmp_path) == before


def test_a_failed_move_into_place_puts_the_old_run_back(snapshot, tmp_path, monkeypatch):
    out = tmp_path / "lora"
    out.mkdir()
    (out / RUN_FILE).write_text("old")
    renames = []

    def rename(source, target):  # the second rename (new run into place) fails, as on a full disk
        renames.append(target)
        if len(renames) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))
        os.replace(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        with writing_run(out, overwrite=True) as folder:
            (folder / RUN_FILE).write_text("new")
    assert len(renames) == 3 and snapshot(tmp_path) == {"lora/run.json": b"old"}


def test_an_empty_folder_takes_a_run_without_overwrite(tmp_path):
    (tmp_path / "lora").mkdir()
    with writing_run(tmp_path / "lora") as folder:
        (folder / RUN_FILE).write_text("{}")
    assert (tmp_path / "lora" / RUN_FILE).is_file()


def test_two_runs_into_one_folder_cannot_interleave(tmp_path):
    out = tmp_path / "lora"
    with writing_run(out) as first:
        with pytest.raises(RuntimeError, match=r"another run is writing into .*lora right now"):
            with writing_run(out, overwrite=True):
                pass
        (first / RUN_FILE).write_text("first")
    assert (out / RUN_FILE).read_text() == "first"
    with writing_run(tmp_path / "other"):  # another folder is free meanwhile
        pass


def test_the_next_run_removes_what_killed_runs_left(tmp_path):
    for leftover in (".lora.partial-abc", ".lora.replaced-def"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / RUN_FILE).write_text("stale")
    (tmp_path / ".lorax.partial-keep").mkdir()  # another run folder's: not ours to remove
    with writing_run(tmp_path / "lora"):
        pass
    assert hidden_leftovers(tmp_path) == [".lorax.partial-keep"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_and_run_folders_get_the_permissions_the_umask_gives(tmp_path, mask):
    old = os.umask(mask)
    try:
        with writing_run(tmp_path / "lora") as folder:
            save_safetensors({"w": torch.zeros(2)}, folder / "weights.safetensors")
            (folder / RUN_FILE).write_text("{}")  # an ordinary file, for comparison
    finally:
        os.umask(old)
    paths = [tmp_path / "lora", *(tmp_path / "lora").iterdir()]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes == {"lora": 0o777 & ~mask, "weights.safetensors": 0o666 & ~mask, RUN_FILE: 0o666 & ~mask}


# ---- Checksums and reading safetensors files ----

def test_a_changed_or_missing_file_is_refused_by_its_fingerprint(tmp_path):
    path = tmp_path / "base.safetensors"
    path.write_bytes(b"x" * 1000)
    recorded = fingerprint(path)
    assert recorded["size"] == 1000 and len(recorded["sha256"]) == 64
    check_fingerprint(path, recorded, "the base", "finetune")  # unchanged: passes
    path.write_bytes(b"x" * 999 + b"y")  # same size, one byte differs
    with pytest.raises(ValueError, match=r"base.safetensors \(the base\) is not the file this run was saved"):
        check_fingerprint(path, recorded, "the base", "finetune")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"base.safetensors \(the base\) is missing; restore it, or "
                                                 "run finetune again"):
        check_fingerprint(path, recorded, "the base", "finetune")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_tensors_with_nan_or_infinity_are_refused_by_name(tmp_path, value):
    path = tmp_path / "a.safetensors"
    save_file({"good": torch.ones(3), "bad": torch.tensor([1.0, value, 2.0])}, path)
    with pytest.raises(ValueError, match=r"a.safetensors: tensor 'bad' holds 1 NaN or infinite values"):
        read_safetensors(path)
    require_finite(torch.tensor([1, 2]), "integers", path)  # not floating point: nothing to check


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    path = save_safetensors({"w": torch.ones(100)}, tmp_path / "a.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="is not a complete safetensors file"):
        read_safetensors(path)


# ---- run.json: every key checked, errors that name the file and the key ----

def edited(run: dict, key: str, value) -> dict:
    """A copy of `run` with `key` ("a" or "a/b") set to `value`, or removed if `value` is `...`."""
    run = json.loads(json.dumps(run))
    *parents, last = key.split("/")
    record = run
    for parent in parents:
        record = record[parent]
    if value is ...:
        del record[last]
    else:
        record[last] = value
    return run


BAD_RUN_RECORDS = [  # (key, value or ... to delete it, what the error must say)
    ("format", ..., "was written by another version of llm-scratch"),
    ("version", 2, r"version 2; this one reads version 3\): run finetune again"),
    ("command", "pretrain", "records a pretrain run, not a finetune run"),
    ("method", ..., "'method' is missing"), ("method", 3, "'method' must be a str"),
    ("model_name", ..., "'model_name' is missing"), ("quick", "yes", "'quick' must be a bool"),
    ("labels", ["ham"], "'labels' must list at least two"),
    ("labels", "ham,spam", "'labels' must be a list"), ("max_length", 0, "'max_length' must be a positive"),
    ("max_length", True, "'max_length' must be a int"), ("max_length", "23", "'max_length' must be a int"),
    ("base", ..., "'base' is missing"), ("base", [], "'base' must be a dict"),
    ("base/kind", "cloud", "'base.kind' must be one of hub, file, random"),
    ("base/path", ..., "'base.path' is missing"), ("base/path", None, "'base.path' must be a str"),
    ("base/sha256", ..., "'base.sha256' is missing"),
    ("base/sha256", "abc", "'base.sha256' is not a SHA-256"),
    ("base/size", -1, "'base.size' must be a file size"), ("base/size", 1.5, "'base.size' must be a int"),
    ("files", ..., "'files' is missing"),
    ("files/adapter.safetensors/sha256", "A" * 64, "'files.adapter.safetensors.sha256' is not a SHA-256"),
    ("files/adapter.safetensors/size", ..., "'files.adapter.safetensors.size' is missing"),
    ("lora_config/rank", 0, "'lora_config' is not a valid LoRA config"),
    ("settings", [], "'settings' must be a dict"),
]


@pytest.mark.parametrize("key, value, message", BAD_RUN_RECORDS,
                         ids=[f"{k}={v!r:.12}" for k, v, _ in BAD_RUN_RECORDS])
def test_a_bad_run_json_is_refused_naming_the_file_and_the_key(quick_runs, tmp_path, key, value, message):
    run_dir = shutil.copytree(quick_runs["lora"], tmp_path / "lora")
    good = json.loads(record_path(run_dir).read_text())
    record_path(run_dir).write_text(json.dumps(edited(good, key, value)))
    with pytest.raises(ValueError, match=message) as error:
        read_record(run_dir, "finetune")
    assert str(record_path(run_dir)) in str(error.value)


@pytest.mark.parametrize("content, message", [
    ("", r"is not valid JSON \(Expecting value: line 1 column 1"),
    ('{"method": "lora",', "is not valid JSON"),
    ("[1, 2]", r"must hold a JSON object \(\{...\}\), not a list"), ("\udcff", "is not valid JSON"),
])
def test_an_empty_or_malformed_run_json_is_refused_naming_the_file(tmp_path, content, message):
    record_path(tmp_path).write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=message) as error:
        read_record(tmp_path, "finetune")
    assert str(record_path(tmp_path)) in str(error.value)


def test_a_good_run_json_reads_back_and_its_run_classifies(quick_runs, messages):
    record = read_record(quick_runs["lora"], "finetune")
    assert record.files == {"adapter.safetensors": fingerprint(quick_runs["lora"] / "adapter.safetensors")}
    base = fingerprint(quick_runs["lora"] / "base_tiny.safetensors")
    assert (record.base.kind, record.base.path, record.base.sha256, record.base.size) == (
        "file", "base_tiny.safetensors", base["sha256"], base["size"])
    assert (record.command, record.method, record.quick, record.labels) == ("finetune", "lora", True,
                                                                            ("ham", "spam"))
    assert record.lora_config.rank == 16 and record.settings["epochs"] == 8 and record.settings["seed"] == 1
    model, _ = load_run(quick_runs["lora"])
    assert not model.training
    predictions = [label for label, _ in classify_with_run(quick_runs["lora"], messages)]
    assert predictions == [classify(text, model, max_length=record.max_length)[0] for text in messages]
    assert set(predictions) <= {"ham", "spam"} and len(predictions) == len(messages)


# ---- Operating-system errors in one line ----

@pytest.mark.parametrize("code, advice", [
    (errno.ENOSPC, "the disk is full"), (errno.EFBIG, "file-size limit"), (errno.EACCES, "no permission"),
    (errno.EROFS, "read-only"), (errno.ENOTDIR, "a file is in the way"),
    (errno.EIO, "check the path and the disk"),
])
def test_operating_system_errors_are_explained_with_their_path(code, advice):
    message = explain_error(OSError(code, os.strerror(code), "/runs/lora/adapter.safetensors"))
    assert message.startswith(f"/runs/lora/adapter.safetensors: {os.strerror(code)}; ") and advice in message
    assert "\n" not in message
    assert explain_error(ValueError("our own message")) == "our own message"
