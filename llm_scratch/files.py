"""Files: writing them so that a crash or a full disk never leaves half a file behind, reading safetensors
files so that a NaN or an infinity never reaches a model unnoticed, and file-system errors in words a
student can act on."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def umask() -> int:
    """The process's umask: the permission bits new files and folders must not have (e.g. 0o022)."""
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it becomes `path` only if the `with` block completes.

    An interrupted write leaves the previous file (or none), never a truncated one: the rename at the end
    is atomic on one file system. The file gets the permissions the umask gives (as `open` would).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~umask())  # mkstemp makes it private (0600); writers may recreate it
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to a safetensors file at `path`, all or nothing; a failed write (a full disk, ...) is
    an OSError naming `path`."""
    with atomic_path(path) as temporary:
        try:
            save_file(tensors, temporary, metadata)
        except SafetensorError as error:  # safetensors reports I/O errors as "... (os error 28)"
            code = re.search(r"os error (\d+)", str(error))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    return Path(path)


def require_finite(tensor: torch.Tensor, name: str, where: str | Path, advice: str = "") -> None:
    """Raise a ValueError naming the tensor and where it is if `tensor` holds a NaN or an infinity."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    # A NaN makes both the minimum and the maximum NaN, an infinity shows in one of them: no temporary tensor
    # as large as the weight (torch.isfinite would allocate one, which loading then leaves as heap holes).
    low, high = torch.aminmax(tensor)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        n_bad = int((~torch.isfinite(tensor)).sum())
        advice = advice or ("the file is damaged or was saved from a run whose training diverged; use "
                            "another file, or train again")
        raise ValueError(f"{where}: tensor {name!r} holds {n_bad:,} NaN or infinite values; {advice}")


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each checked to be finite; clear errors for a missing or
    unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}; check the path")
    try:
        tensors = load_file(str(path), device=str(device))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a complete safetensors file ({error}); it is damaged or was cut "
                         "short: write it again") from None
    for name, tensor in tensors.items():
        require_finite(tensor, name, path)
    return tensors


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
    to do (disk full, no permission, ...)."""
    if not isinstance(error, OSError) or error.errno is None:
        return str(error)
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    advice = _OS_ADVICE.get(error.errno, "check the path and the disk")
    return f"{where or 'a file'}: {error.strerror or error}; {advice}"
