"""A run folder on disk: written whole or not at all, one run at a time, tied by checksums to its files.

A fine-tuning run writes into a new hidden folder beside its `out` folder (`.NAME.partial-XXXX`) and moves
it into place only once everything is written: until then an existing `out` is untouched, and a run that
fails, is stopped with Ctrl-C or is killed leaves it as it was. A lock file beside it (`.NAME.lock`) keeps
two runs from writing into the same folder at once. `run.json` records the SHA-256 and size of the base
weights and of the trained tensors, and `read_run` refuses a record that lacks or garbles a key.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llm_scratch.config import GPTConfig
from llm_scratch.files import read_safetensors, umask
from llm_scratch.model import GPTModel
from llm_scratch.pretrained import download_gpt2, load_gpt2

RUN_FILE = "run.json"  # how to rebuild the classifier, with the checksums of the files it needs
METRICS_FILE = "metrics.json"  # what the run measured
ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's trained tensors (A, B and the head)
WEIGHTS_FILE = "weights.safetensors"  # a full or last-block run's trained tensors
QUICK_BASE_FILE = "base_tiny.safetensors"  # quick mode's base model (tiny, random weights)
FIGURE_FILES = ("loss.png", "accuracy.png")
# Every name a run writes: a folder holding only these (or nothing) is one that --overwrite may replace.
RUN_FILES = frozenset({RUN_FILE, METRICS_FILE, ADAPTER_FILE, WEIGHTS_FILE, QUICK_BASE_FILE, *FIGURE_FILES})
BASE_KINDS = ("hub", "file", "random")  # where a run's base model came from (run.json's base.kind)


# ---- Writing a run folder: all or nothing, one run at a time ----

def check_out(out: Path, overwrite: bool) -> None:
    """Raise a ValueError if `out` cannot take a run: the current folder or one above it, a file, a folder
    holding files no run writes, or (unless `overwrite`) a folder that already holds a run."""
    out, here = Path(out), Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ValueError(f"the run folder {str(out)!r} is the current folder or one above it, which a run "
                         "would replace; give the run a folder of its own (e.g. --out runs/lora)")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder; choose another run folder (--out)")
    names = sorted(path.name for path in out.iterdir())
    foreign = [name for name in names if name not in RUN_FILES]
    if foreign:
        raise ValueError(f"{out} holds files a run does not write ({', '.join(foreign[:3])}); a run replaces "
                         "its whole folder, so choose another run folder (--out) or move those files away")
    if names and not overwrite:
        raise ValueError(f"{out} already holds a run; pass --overwrite (overwrite=True) to replace it once "
                         "the new run is complete, or choose another run folder (--out)")


def _try_lock(handle) -> bool:
    """Take an exclusive lock on an open file without waiting; False if another process holds it.

    The operating system releases it when the process ends, however it ends (even killed)."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold the lock file `.NAME.lock` beside `out`; a RuntimeError if another run holds it."""
    lock = out.parent / f".{out.name}.lock"
    with open(lock, "a") as handle:
        # Locked, and (checked once locked) still the file at that path, not one a run that ended deleted?
        locked = _try_lock(handle)
        if not locked or not lock.exists() or os.stat(lock).st_ino != os.fstat(handle.fileno()).st_ino:
            raise RuntimeError(f"another run is writing into {out} right now (it holds the lock {lock}); "
                               "wait until it ends, or choose another run folder (--out)")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # Windows keeps an open file: the lock file stays there
                lock.unlink()  # while still holding it, so that no other run can be holding it


def _leftovers(out: Path) -> list[Path]:
    """Temporary folders of earlier runs into `out` that were killed before they could clean up."""
    pattern = glob.escape(str(out.parent / f".{out.name}."))
    return [Path(p) for kind in ("partial", "replaced") for p in sorted(glob.glob(f"{pattern}{kind}-*"))]


@contextmanager
def writing_run(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """An empty folder beside `out` to write a run into; it becomes `out` only if the `with` block completes.

    `out` is checked first (`check_out`) and stays untouched until then; an error, Ctrl-C or a kill leaves
    it as it was. A second run into the same `out` is refused while this one runs.
    """
    out = Path(out)
    check_out(out, overwrite)  # before any work: a refused folder costs the user no waiting
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        for leftover in _leftovers(out):  # no other run is writing into `out`: these are stale
            shutil.rmtree(leftover, ignore_errors=True)
        check_out(out, overwrite)  # again: a run may have ended between the first check and the lock
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            staging.chmod(0o777 & ~umask())  # mkdtemp makes the folder private (0700)
            yield staging
            if out.exists():  # an empty folder or a run that may be replaced (checked above)
                replaced = out.parent / f".{out.name}.replaced-{staging.name.rsplit('-', 1)[1]}"
                os.rename(out, replaced)
                try:
                    os.rename(staging, out)  # a kill between the two renames leaves no `out`: refused
                except OSError:
                    os.rename(replaced, out)  # the old run back in place
                    raise
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.rename(staging, out)
        except OSError as error:  # name the file where the user will look for it: in `out`
            shutil.rmtree(staging, ignore_errors=True)
            where = str(error.filename or "")
            if error.errno is None or not where.startswith(str(staging)):
                raise
            raise OSError(error.errno, error.strerror, str(out) + where[len(str(staging)):]) from error
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


# ---- Checksums: a run folder is tied to the exact files it was trained with ----

def fingerprint(path: str | Path) -> dict:
    """{"sha256": hex digest, "size": bytes} of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while piece := file.read(1 << 20):
            digest.update(piece)
    return {"sha256": digest.hexdigest(), "size": Path(path).stat().st_size}


def check_fingerprint(path: str | Path, recorded: dict, what: str) -> None:
    """Raise unless the file at `path` has the size and SHA-256 that run.json recorded for it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} ({what}) is missing; restore it, or run finetune again")
    if path.stat().st_size != recorded["size"] or fingerprint(path)["sha256"] != recorded["sha256"]:
        raise ValueError(f"{path} ({what}) is not the file this run was saved with: its size or SHA-256 "
                         f"differs from the one in {RUN_FILE}. Restore the original file, or run finetune "
                         "again to train on this one")


# ---- Loading a run's models: the base it started from and the tensors it trained ----

def load_base(source: dict, run_dir: Path, device: torch.device) -> GPTModel:
    """The base model a run started from (run.json's `base`: pretrained, a local file, or the same random
    init); a weights file must have the SHA-256 and size that `source` recorded."""
    if source["kind"] == "random":
        torch.manual_seed(source["seed"])
        return GPTModel(GPTConfig.from_preset(source["model_name"])).to(device)
    path = download_gpt2(source["model_name"]) if source["kind"] == "hub" else Path(run_dir) / source["path"]
    check_fingerprint(path, source, "the base model's weights")
    return load_gpt2(source["model_name"], weights_path=path, device=device)


def load_trained_weights(model: GPTModel, path: str | Path, names: list[str]) -> None:
    """Load the trained tensors of a full or last-block run strictly: exactly the parameters `names`, each
    with its shape, none NaN or infinite; the model's other tensors stay those of its base."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if name in set(names)}
    trained = read_safetensors(path, device=model.tok_emb.weight.device)  # refuses NaN and infinity
    found = {name: tuple(tensor.shape) for name, tensor in trained.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        reshaped = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ValueError(f"{path} does not hold exactly the tensors the run trained: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {reshaped[:3]}; the file is damaged or "
                         "from another run: run finetune again")
    model.load_state_dict(trained, strict=False)  # not strict: the other tensors are the base model's


# ---- Reading run.json: every key checked, errors that name the file and the key ----

def _field(record: dict, key: str, kind: type, path: Path, prefix: str = ""):
    """`record[key]`, checked to be a `kind` (True and False do not count as int)."""
    if key not in record:
        raise ValueError(f"{path}: the key {prefix + key!r} is missing; the file is damaged or was written "
                         "by another version of llm-scratch: run finetune again")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{path}: the key {prefix + key!r} must be a {kind.__name__}, got {value!r:.60}; "
                         "the file is damaged or was edited: run finetune again")
    return value


def _checksum_fields(record: dict, path: Path, prefix: str) -> None:
    digest = _field(record, "sha256", str, path, prefix)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{path}: the key {prefix + 'sha256'!r} is not a SHA-256 hex digest "
                         f"({digest!r:.70})")
    if _field(record, "size", int, path, prefix) < 0:
        raise ValueError(f"{path}: the key {prefix + 'size'!r} must be a file size in bytes, not negative")


def read_run(run_dir: str | Path, methods: tuple[str, ...]) -> dict:
    """run.json of the run folder `run_dir`, with every key `load_run` needs checked (ValueError naming the
    file and the key otherwise); `methods` are the methods a run may have."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the folder a finetune run wrote (its --out)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is damaged: run finetune "
                         "again") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), not a {type(run).__name__}")
    if _field(run, "method", str, path) not in methods:
        raise ValueError(f"{path}: the key 'method' must be one of {', '.join(methods)}, got "
                         f"{run['method']!r}")
    _field(run, "model_name", str, path)
    labels = _field(run, "labels", list, path)
    if len(labels) < 2 or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{path}: the key 'labels' must list at least two class names, got {labels!r:.60}")
    if _field(run, "max_length", int, path) < 1:
        raise ValueError(f"{path}: the key 'max_length' must be a positive number of tokens")
    base = _field(run, "base", dict, path)
    if _field(base, "kind", str, path, "base.") not in BASE_KINDS:
        raise ValueError(f"{path}: the key 'base.kind' must be one of {', '.join(BASE_KINDS)}, got "
                         f"{base['kind']!r}")
    _field(base, "model_name", str, path, "base.")
    if base["kind"] == "random":
        _field(base, "seed", int, path, "base.")
    else:
        if base["kind"] == "file":
            _field(base, "path", str, path, "base.")
        _checksum_fields(base, path, "base.")
    _checksum_fields(_field(run, "trained", dict, path), path, "trained.")
    return run


# ---- Operating-system errors in words a student can act on ----

_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, or choose a folder on another disk",
    errno.EFBIG: "the file is larger than this system allows (a file-size limit, see `ulimit -f`)",
    errno.EACCES: "no permission: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "no permission: choose a folder you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
    errno.EEXIST: "a file is in the way where a folder is needed: move it, or choose another path",
    errno.ENOTDIR: "a file is in the way where a folder is needed: move it, or choose another path",
    errno.EISDIR: "a folder is in the way where a file is needed: choose another path",
    errno.ENOENT: "no such file or folder: check the path",
}


def explain_error(error: BaseException) -> str:
    """One line for the user: our own errors as they are; an operating-system error with its path and what
    to do (disk full, no permission, ...); Ctrl-C with what it left."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C): the run in progress changed no run folder and left no file half-written"
    if not isinstance(error, OSError) or error.errno is None:
        return str(error)
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    advice = _OS_ADVICE.get(error.errno, "check the path and the disk")
    return f"{where or 'a file'}: {error.strerror or error}; {advice}"
