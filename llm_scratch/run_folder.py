"""Run folders on disk: written whole or not at all, one run at a time, tied by checksums to their files.

A run writes into a new hidden folder beside its `out` folder (`.NAME.partial-XXXX`) and moves it into place
only once everything is written: until then an existing `out` is untouched, and a run that fails, is stopped
with Ctrl-C or is killed leaves it as it was. A lock file beside it (`.NAME.lock`) keeps two runs from
writing into the same folder at once. What a run folder may hold, and its record, are the run layer's
(`llm_scratch.run_record`); this module only moves folders and hashes files.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_scratch.files import umask

# ---- Writing a run folder: all or nothing, one run at a time ----

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
def writing_run(out: str | Path, check: Callable[[Path], None]) -> Iterator[Path]:
    """An empty folder beside `out` to write a run into; it becomes `out` only if the `with` block completes.

    `check(out)` raises if `out` may not take the run (`llm_scratch.run_record.check_out`); it runs first and
    again once the lock is held. `out` stays untouched until the end; an error, Ctrl-C or a kill leaves it as
    it was. A second run into the same `out` is refused while this one runs.
    """
    out = Path(out)
    check(out)  # before any work: a refused folder costs the user no waiting
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        for leftover in _leftovers(out):  # no other run is writing into `out`: these are stale
            shutil.rmtree(leftover, ignore_errors=True)
        check(out)  # again: a run may have ended between the first check and the lock
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


def check_fingerprint(path: str | Path, recorded: dict, what: str, command: str) -> None:
    """Raise unless the file at `path` has the size and SHA-256 that the run's record holds for it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} ({what}) is missing; restore it, or run {command} again")
    if path.stat().st_size != recorded["size"] or fingerprint(path)["sha256"] != recorded["sha256"]:
        raise ValueError(f"{path} ({what}) is not the file this run was saved with: its size or SHA-256 "
                         "differs from the one in the run's record. Restore the original file, or run "
                         f"{command} again to train on this one")
