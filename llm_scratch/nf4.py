"""4-bit NormalFloat (NF4): the frozen base weights of QLoRA (Dettmers et al. 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs").

QLoRA trains LoRA's A and B in full precision beside a frozen base whose Linear weights are stored in 4 bits:

1. The weight is cut into blocks of 64 consecutive values (of the flattened weight). Each block is divided by
   its largest magnitude (its absmax), so its values fall in [-1, 1].
2. Each value becomes the index (0..15) of the nearest of 16 code values. NF4's code values are quantiles of
   the standard normal distribution: pretrained weights are roughly normal, so each code value is used about
   equally often. Two indices share one byte, the first in the high 4 bits.
3. Double quantization: the absmax constants (one float32 per 64 weights, 0.5 bits per weight) are stored in
   8 bits too, in blocks of 256, with one float32 scale per block: 4 + 8/64 + 32/(64 * 256) = 4.127 bits per
   weight instead of 4.5.

The layout, the code values, the tie rule and the arithmetic are those of bitsandbytes'
`quantize_4bit(w, quant_type="nf4", blocksize=64)`, so codes and absmax are bit-identical to its own. For
double quantization (its `compress_statistics=True`) the 8-bit codes here are always the nearest code value;
bitsandbytes' CPU kernel sometimes takes the neighbour of a value that lies close to the midpoint between two
(tests/test_nf4.py measures how often, and what it changes). `LinearNF4` is a frozen Linear layer that keeps
only this 4-bit state and dequantizes its weight when it computes, in forward and again in backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import cache
from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import nn

BLOCKSIZE = 64  # weights per absmax constant
ABSMAX_BLOCKSIZE = 256  # absmax constants per float32 scale, with double quantization
# The outermost quantile of the code: the QLoRA paper's 1 - (1/30 + 1/32) / 2 = 0.96770833..., written with
# 7 digits as bitsandbytes writes it. Quantiles at 1 - offset and offset would be +-1.85 standard deviations.
NF4_OFFSET = 0.9677083
# The 16 NF4 code values, sorted, exactly as bitsandbytes stores them (float32). `normal_float_code()` derives
# them; the quantization uses this table so that its codes are bit-identical to bitsandbytes'.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
    1.0,
], dtype=torch.float32)


def normal_float_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values from quantiles of N(0, 1), as the QLoRA paper builds them: 8 positive and 7
    negative quantiles and an exact 0, divided by the largest so that they span [-1, 1].

    Asymmetric on purpose: with 16 values and an exact zero (for padding and zero weights), one side gets
    one more. The positive quantiles sit at probabilities linspace(offset, 0.5, 9) (the last one, 0.5, is
    the zero), the negative ones at linspace(offset, 0.5, 8), mirrored.
    """
    normal = NormalDist()
    positive = [normal.inv_cdf(offset + (0.5 - offset) * i / 8) for i in range(8)]
    negative = [-normal.inv_cdf(offset + (0.5 - offset) * i / 7) for i in range(7)]
    values = sorted(negative + [0.0] + positive)
    return torch.tensor([v / values[-1] for v in values], dtype=torch.float32)  # (16,)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2016), which double quantization stores the
    absmax constants in: 256 sorted values in [-0.993, 1], dense near 0 and sparse near 1.

    For each decade 10^-6, ..., 10^0 it holds 2^k values (k = 0..6, one more bit of fraction per decade)
    of both signs: the midpoints of 2^k + 1 equal steps from 0.1 to 1, times the decade. Plus 0 and 1.
    """
    values = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, 2**k + 1)  # float32, as bitsandbytes computes them
        midpoints = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)
        values += midpoints.tolist() + (-midpoints).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The index of the code value nearest to each of `scaled` (`code` sorted), as uint8.

    Nearest means: above the midpoint between two neighbouring code values goes up. A value exactly on a
    midpoint goes down, to the smaller code value, as bitsandbytes' reference quantizer decides ties.
    """
    midpoints = (code[:-1] + code[1:]) / 2  # (len(code) - 1,)
    # bucketize counts the midpoints strictly below each value: that count is the nearest code's index.
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """A 1-D tensor as (n_blocks, blocksize) rows, the last one padded with zeros when it is short."""
    short = -flat.numel() % blocksize  # how many values the last block lacks
    return (F.pad(flat, (0, short)) if short else flat).view(-1, blocksize)


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight of any shape to NF4: (packed codes uint8 (ceil(n / 2),), absmax float32 (n_blocks,)).

    Blocks of 64 consecutive values of the flattened weight; the last block may be shorter. Two 4-bit codes
    per byte, the first value in the high 4 bits; an odd count pads the last byte with the code of 0 (7).
    """
    flat = weight.detach().reshape(-1).float()  # (n,)
    blocks = _blocks(flat, BLOCKSIZE)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    # Multiplying by the reciprocal (not dividing) rounds as bitsandbytes does; `tiny` keeps 0/0 out of an
    # all-zero block, whose values all map to the code of 0.
    scaled = blocks * (1 / absmax.clamp(min=torch.finfo(torch.float32).tiny))[:, None]  # in [-1, 1]
    codes = nearest_code(scaled, NF4_CODE.to(weight.device)).view(-1)  # (n_blocks * 64,)
    codes = codes[: 2 * math.ceil(flat.numel() / 2)]  # an even count; a padded value's code is that of 0
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n / 2),): the first of each pair in the high nibble
    return packed, absmax


@cache
def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: for every byte, the NF4 values of its high and its low 4 bits."""
    byte = torch.arange(256)
    return torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], dim=1).to(device)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of `shape` back from its packed codes and float32 absmax, in `dtype`.

    One gather reads both values of every byte from a 256-row table, one multiply scales each block: each
    value is NF4_CODE[code] * absmax in float32, then rounded once to `dtype`, as bitsandbytes computes it.
    The gather moves each byte's two float32 values as one 64-bit integer: the same bits, in fewer copies.
    """
    n = math.prod(shape)
    pairs = _byte_table(packed.device).view(torch.int64).view(-1)  # (256,): a byte's two values, as 8 bytes
    values = pairs.index_select(0, packed.int()).view(torch.float32)[:n]  # (n,)
    blocks = _blocks(values, BLOCKSIZE)  # (n_blocks, 64), a new tensor: free to overwrite
    if dtype == torch.float32:
        out = blocks.mul_(absmax[:, None])
    else:
        out = torch.mul(blocks, absmax[:, None], out=torch.empty_like(blocks, dtype=dtype))  # rounded once
    return out.view(-1)[:n].view(shape)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the absmax constants: (codes uint8 (n_blocks,), scales float32
    (ceil(n_blocks / 256),), offset float32 ()).

    The mean is subtracted first (absmax values are all positive, the dynamic code is signed), then each
    block of 256 is divided by its largest magnitude and mapped to the nearest of the 256 dynamic code values.
    """
    offset = absmax.mean()  # ()
    blocks = _blocks(absmax - offset, ABSMAX_BLOCKSIZE)  # (n_scales, 256)
    scales = blocks.abs().amax(dim=1)  # (n_scales,)
    scaled = blocks / scales.clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # divided, as bitsandbytes
    codes = nearest_code(scaled, dynamic_code().to(absmax.device)).view(-1)[: absmax.numel()]
    return codes, scales, offset


@cache
def _dynamic_table(device: torch.device) -> torch.Tensor:
    return dynamic_code().to(device)


def dequantize_absmax(codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The absmax constants (n_blocks,) float32 back from their 8-bit codes: code value * scale + offset."""
    per_block = scales.repeat_interleave(ABSMAX_BLOCKSIZE)[: codes.numel()]  # (n_blocks,)
    return _dynamic_table(codes.device).index_select(0, codes.int()) * per_block + offset


def bits_per_weight(double_quant: bool = True) -> float:
    """Storage per weight of a large NF4 weight: 4 + 32/64 = 4.5 bits, or with double quantization
    4 + 8/64 + 32/(64 * 256) = 4.127 bits (plus one float32 offset per weight matrix)."""
    if double_quant:
        return 4 + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * ABSMAX_BLOCKSIZE)
    return 4 + 32 / BLOCKSIZE


class _LinearNF4Function(torch.autograd.Function):
    """x @ W^T + b with W dequantized in forward and dequantized again in backward.

    Autograd would otherwise keep the dequantized W (a full-precision copy of every layer) until backward.
    Here nothing is saved but a reference to the layer, whose 4-bit state is all that stays in memory. W is
    frozen, so backward returns the input's gradient only; x is not needed for it and is not saved either.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: LinearNF4) -> torch.Tensor:
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, layer.dequantize(x.dtype), bias)  # (..., out_features)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output @ ctx.layer.dequantize(grad_output.dtype), None  # (..., in_features)


class LinearNF4(nn.Module):
    """A frozen `nn.Linear` whose weight is stored in NF4: packed codes (uint8), the absmax constants
    (float32, or 8-bit with `double_quant`), and the bias (float32). All are buffers: nothing here trains.

    It computes in float32, or in bfloat16/float16 inside `torch.autocast` (the matrix product's type there).
    Make one with `LinearNF4.from_linear(linear)`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, double_quant: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.double_quant = in_features, out_features, double_quant
        n = in_features * out_features
        n_blocks = math.ceil(n / BLOCKSIZE)
        self.register_buffer("packed", torch.zeros(math.ceil(n / 2), dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scales", torch.zeros(math.ceil(n_blocks / ABSMAX_BLOCKSIZE),
                                                              device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True) -> LinearNF4:
        """A 4-bit copy of `linear` on its device (a meta-device linear gives a meta-device layer)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"LinearNF4.from_linear quantizes an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, double_quant,
                    device=weight.device)
        if weight.is_meta:  # shapes only, e.g. to count a large model's bytes without building it
            return layer
        layer.packed, absmax = quantize_nf4(weight)
        if double_quant:
            layer.absmax_codes, layer.absmax_scales, layer.absmax_offset = quantize_absmax(absmax)
        else:
            layer.absmax = absmax
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def scales(self) -> torch.Tensor:
        """The absmax constant of every block of 64 weights, (n_blocks,) float32."""
        scales = (self.absmax_scales, self.absmax_offset) if self.double_quant else (self.absmax,)
        if any(s.dtype != torch.float32 for s in scales):
            raise RuntimeError("a 4-bit layer's scales must stay float32, and model.to(dtype) or .half() "
                               "converted them; keep the model in float32 and use torch.autocast (the "
                               "--precision option) for 16-bit arithmetic")
        if self.double_quant:
            return dequantize_absmax(self.absmax_codes, self.absmax_scales, self.absmax_offset)
        return self.absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype`, rebuilt from the 4-bit state."""
        return dequantize_nf4(self.packed, self.scales(), (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The type the product runs in: autocast's (bf16 or fp16), as for nn.Linear, else x's own.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # A 2-D product, so that the Function's output is a tensor of its own (not a view), which LoRA then
        # adds to in place.
        out = _LinearNF4Function.apply(x.to(dtype).reshape(-1, self.in_features), self)  # (tokens, out)
        return out.view(*x.shape[:-1], self.out_features)  # (..., out_features)

    def extra_repr(self) -> str:
        quant = "NF4 + double-quantized absmax" if self.double_quant else "NF4"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {quant}")


def quantize_linears(module: nn.Module, names: Iterable[str] | None = None,
                     double_quant: bool = True) -> list[str]:
    """Replace the `nn.Linear` layers inside `module` that `names` lists (default: every one) by their
    `LinearNF4`, in place; return their names.

    Quantizing one transformer block at a time (`quantize_linears(model.blocks[i])`) never holds more than
    that block in full precision. Not for a module whose Linear shares its weight (GPT-2's tied head).
    """
    if isinstance(module, nn.Linear):
        raise ValueError("quantize_linears replaces the Linear layers inside a module; for one layer use "
                         "LinearNF4.from_linear(linear)")
    linears = [name for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    names = linears if names is None else list(names)
    unknown = [name for name in names if name not in linears]
    if unknown:
        raise ValueError(f"quantize_linears: {unknown[:3]} name no nn.Linear inside the module; its Linear "
                         f"layers: {linears[:4]}{', ...' if len(linears) > 4 else ''}")
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = module.get_submodule(parent) if parent else module
        setattr(holder, child, LinearNF4.from_linear(getattr(holder, child), double_quant))
    return names
