"""Loading GPT-2 as QLoRA's base: peak memory and time of reading a checkpoint three ways, each in a fresh
process.

    python benchmarks/bench_qlora_load.py                      # gpt2-xl shape: writes a 6.2 GB file first
    python benchmarks/bench_qlora_load.py --preset gpt2-small
    python benchmarks/bench_qlora_load.py --weights model.safetensors   # a GPT-2 checkpoint you have

The three ways:
- float32: `load_gpt2(weights_path=...)`, the base LoRA trains beside;
- float32, then quantized: the same, then `quantize_linears` on every Linear of the blocks, which is what
  `replace_linear_with_lora` with `quantize_base="nf4"` does to a model loaded in float32;
- 4-bit while reading: `load_gpt2(weights_path=..., nf4_layers=...)`, each block quantized as soon as it is
  read, which is how `finetune --method qlora` and `instruct --method qlora` load their base.

Without `--weights`, a checkpoint of the preset's shape with random weights is written to a temporary folder
first (the values do not change the memory or the time). Each process first loads a checkpoint of the tiny
preset the same way, so that what PyTorch sets up on first use (about 110 MB on the build machine) is not
counted. The figures: the process's resident memory after that warm-up, its peak resident memory (VmHWM) by
the end of the load, the difference, and the seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine_description, process_memory_mb  # benchmarks/ is on the path when run as a script

from llm_scratch.checkpoint import infer_config, normalize_keys, read_checkpoint_header
from llm_scratch.config import PRESETS, QUICK_PRESET
from llm_scratch.lora import LoRAConfig, find_lora_targets
from llm_scratch.model import GPTModel
from llm_scratch.nf4 import quantize_linears
from llm_scratch.pretrained import load_gpt2, save_gpt2_safetensors

WAYS = ("float32", "float32, then quantized", "4-bit while reading")
QLORA = LoRAConfig(quantize_base="nf4")  # its targets, every Linear of the blocks, are stored in 4 bits


def shapes_only(weights: Path) -> GPTModel:
    """The GPT-2 that `weights` holds, with shapes only (the meta device): its names, no memory."""
    shapes, metadata = read_checkpoint_header(weights)
    with torch.device("meta"):
        return GPTModel(infer_config(normalize_keys(shapes, weights), metadata, weights))


def load(way: str, weights: Path) -> GPTModel:
    """The model in `weights`, loaded the `way` named."""
    if way == "4-bit while reading":
        return load_gpt2(weights_path=weights, nf4_layers=find_lora_targets(shapes_only(weights), QLORA))
    model = load_gpt2(weights_path=weights)
    if way == "float32, then quantized":
        quantize_linears(model, find_lora_targets(model, QLORA))
    return model


def _measure_own_load(way: str, weights: Path, warmup: Path) -> None:
    """Load `warmup`, then `weights`, the `way` named, in this (fresh) process; print the figures as JSON."""
    load(way, warmup)
    before = process_memory_mb("VmRSS")
    start = time.perf_counter()
    model = load(way, weights)
    seconds = time.perf_counter() - start
    print(json.dumps({"before_mb": before, "peak_mb": process_memory_mb("VmHWM"), "seconds": seconds,
                      "parameters": sum(t.numel() for t in model.state_dict().values())}))


def load_figures(way: str, weights: Path, warmup: Path) -> dict[str, float]:
    """The figures of loading `weights` the `way` named, measured in a fresh process."""
    command = [sys.executable, __file__, "--measure", way, "--weights", str(weights), "--warmup", str(warmup)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    print(f"{way}: {figures}", file=sys.stderr, flush=True)  # progress
    return figures


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="gpt2-xl",
                        help="the shape of the random checkpoint written first (default: gpt2-xl)")
    parser.add_argument("--weights", type=Path, help="load this GPT-2 safetensors file instead")
    parser.add_argument("--measure", choices=WAYS, help=argparse.SUPPRESS)  # one load, in this process
    parser.add_argument("--warmup", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        _measure_own_load(args.measure, args.weights, args.warmup)
        return {}
    if args.weights is not None and not args.weights.is_file():
        parser.error(f"no weights file at {args.weights}")
    command = "python benchmarks/bench_qlora_load.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-qlora-load-") as folder:
        torch.manual_seed(0)
        warmup = save_gpt2_safetensors(GPTModel(PRESETS[QUICK_PRESET]), Path(folder) / "warmup.safetensors")
        weights = args.weights
        if weights is None:
            model = GPTModel(PRESETS[args.preset])  # freed once written: not held while the loads run
            weights = save_gpt2_safetensors(model, Path(folder) / "model.safetensors")
            del model
            print(f"wrote a random {args.preset} checkpoint: {weights.stat().st_size:,} bytes",
                  file=sys.stderr)
        figures = {way: load_figures(way, weights, warmup) for way in WAYS}
    what = args.weights or f"a {args.preset}-shaped checkpoint with random weights"
    print(f"\nMachine: {machine_description()}  \nCommand: `{command.strip()}`\n\nLoading {what}, each "
          "way in a fresh process:\n\n| way | resident before | peak | peak - before | seconds |\n"
          "|---|---:|---:|---:|---:|")
    for way, f in figures.items():
        print(f"| {way} | {f['before_mb']:,.0f} MB | {f['peak_mb']:,.0f} MB | "
              f"{f['peak_mb'] - f['before_mb']:,.0f} MB | {f['seconds']:.1f} s |")
    return figures


if __name__ == "__main__":
    main()
