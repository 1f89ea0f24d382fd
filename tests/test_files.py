from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llm_scratch import files
from llm_scratch.files import save_safetensors


def test_save_writes_the_tensors_and_metadata(tmp_path):
    weights = torch.arange(6.0).view(2, 3)
    path = save_safetensors({"w": weights}, tmp_path / "sub" / "a.safetensors", {"k": "v"})
    assert torch.equal(load_file(path)["w"], weights)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"k": "v"}
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]


def test_an_interrupted_save_keeps_the_old_file_and_leaves_no_half_file(tmp_path, monkeypatch):
    path = save_safetensors({"w": torch.zeros(3)}, tmp_path / "a.safetensors")

    def crash_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # a student pressing stop, or a full disk

    monkeypatch.setattr(files, "save_file", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors({"w": torch.ones(3)}, path)
    assert torch.equal(load_file(path)["w"], torch.zeros(3))  # the previous file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_require_finite_finds_one_bad_value_anywhere_in_every_float_type(dtype, bad):
    weights = torch.randn(3, 50_000).to(dtype)  # large enough for the vectorized reductions
    files.require_finite(weights, "w", "here")  # finite: accepted
    files.require_finite(torch.empty(0, 5, dtype=dtype), "w", "here")  # empty: nothing to refuse
    for position in (0, 77_777, weights.numel() - 1):
        poisoned = weights.clone()
        poisoned.view(-1)[position] = bad
        with pytest.raises(ValueError, match="here: tensor 'w' holds 1 NaN or infinite values"):
            files.require_finite(poisoned, "w", "here")
