"""Saving weights so that a crash or a full disk never leaves half a file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to a safetensors file at `path`, all or nothing.

    The file is written under a temporary name in the same folder and renamed when complete: an
    interrupted save leaves the previous file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata)
        os.replace(temporary, path)  # atomic on one file system
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
