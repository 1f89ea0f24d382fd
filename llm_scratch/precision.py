"""Mixed precision: the big matrix products in 16-bit floats, the trained weights in float32.

- fp32: everything in float32, the default.
- bf16: bfloat16 keeps float32's range with fewer digits (about 3 significant decimals), so it needs no loss
  scaling. It is fast on recent CPUs (AVX-512 BF16, AMX, Arm BF16) and on GPUs from NVIDIA's Ampere on.
- fp16: float16 has more digits but a narrow range: small gradients would round to zero. So the loss is
  multiplied by a large factor before `backward()` and the gradients divided by it before the step (PyTorch's
  `GradScaler`), which also skips a step whose gradients overflowed. Fast on GPUs.

Inside `autocast`, PyTorch runs matrix products in the 16-bit type and keeps softmax, normalization and losses
in float32. What does not change: the parameters, their gradients, AdamW's state and the saved files stay
float32; only the arithmetic of the forward (and so of the backward) pass is rounded more coarsely.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ADVICE = {"bf16": "use --precision fp16 on a GPU, or fp32", "fp16": "use --precision bf16 or fp32"}


def check_precision(precision: str, device: torch.device | str | None = None) -> None:
    """Refuse an unknown precision, or (given a `device`) one whose 16-bit type it cannot compute quickly."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device is not None and precision != "fp32" and not device_supports(precision, torch.device(device)):
        name = {"bf16": "bfloat16", "fp16": "float16"}[precision]
        where = {"cpu": "this CPU", "cuda": f"the GPU {device}", "mps": "this Mac's GPU (MPS)"}.get(
            torch.device(device).type, f"the device {device}")
        raise RuntimeError(f"--precision {precision} needs fast {name} arithmetic, which {where} lacks; "
                           f"{ADVICE[precision]}")


def device_supports(precision: str, device: torch.device) -> bool:
    """True when `device` has hardware support for the 16-bit type of `precision` ("bf16" or "fp16")."""
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return precision == "fp16" or torch.backends.mps.is_macos_or_newer(14, 0)
    if device.type == "cpu":  # oneDNN knows the CPU's instructions (AVX-512 BF16 and AMX, Arm BF16, ...)
        check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
        try:
            return bool(getattr(torch.ops.mkldnn, check)())
        except (AttributeError, RuntimeError):  # a build without oneDNN: emulated, far slower than fp32
            return False
    return False


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context to run forward passes in: `torch.autocast` to bf16 or fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16; for fp32 and bf16 a scaler that does nothing (scale 1, plain optimizer step)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
