"""QLoRA against LoRA on this CPU: peak memory and time of one training step of a classifier, and where
QLoRA's extra time goes.

    python benchmarks/bench_qlora.py              # gpt2-large shape, batch 8 x 120 tokens (hours, see below)
    python benchmarks/bench_qlora.py --smoke      # tiny shapes, a few steps (what CI runs)

The model: GPT-2 of the preset's shape with random weights and a 2-class head, LoRA (rank 16, alpha 16) on
every Linear of the blocks, the head trained. LoRA keeps the blocks' weights in float32; QLoRA stores them in
NF4 with double quantization (`LoRAConfig(quantize_base="nf4")`). Both models are built on the meta device and
given their weights one block at a time, QLoRA quantizing each block as soon as it exists, so that building
the 4-bit model never holds the float32 one.

Memory: each model (LoRA and QLoRA, each with and without activation checkpointing) is built and trained in
a fresh process. After one warm-up step (AdamW's state then exists), writing 5 to /proc/self/clear_refs resets
the process's peak resident memory (VmHWM) to its current resident memory; the figure is VmHWM after the next
training step: everything resident at the step's highest point (Python and PyTorch, the model, AdamW's state,
the activations kept for backward, temporaries). The resident memory before that step already holds most of
it: the allocator keeps the pages that the warm-up step's activations used. The process's peak over its whole
life (building included) is shown too.

Time: LoRA, QLoRA and QLoRA with checkpointing step in turn in one process; a ratio is the median of the
per-round ratios, so a busy moment of the machine slows both sides alike. fp32, and bf16 under autocast where
the CPU has bfloat16 arithmetic. The profile (torch.profiler, one fp32 step of each timed model after a
warm-up) splits a step's time into dequantization in forward, dequantization in backward, matrix products and
the rest.

On the 2-core build machine, shared and busy, the eight memory processes took 52 minutes and one fp32 round
of the three steps 10 minutes (a run makes 4 rounds per precision); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch
from bench_finetune import (  # benchmarks/ is on the path when run as a script
    add_step_options,
    parse_step_args,
    random_batch,
    train_step,
)
from bench_precision import MATMUL_OPS
from common import machine_description, median_ratio, medians, process_memory_mb, times_in_turn
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from llm_scratch import nf4
from llm_scratch.classifier import add_classification_head
from llm_scratch.config import GPTConfig
from llm_scratch.methods import CLASSIFIER_LORA, prepare_for_method
from llm_scratch.model import GPTModel
from llm_scratch.precision import device_supports

MEMORY_MODELS = ("LoRA", "LoRA + checkpointing", "QLoRA", "QLoRA + checkpointing")
TIMED_MODELS = ("LoRA", "QLoRA", "QLoRA + checkpointing")
DEQUANTIZE = "LinearNF4.dequantize"  # the profiler's label around every dequantization


def random_init(module: nn.Module) -> None:
    """Give a meta-device module real tensors with GPT-2's initial values: weights N(0, 0.02), biases and
    LayerNorm shifts 0, LayerNorm scales 1."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("scale"):
                param.fill_(1.0)
            elif name.endswith(("shift", "bias")):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)


def build(name: str, cfg: GPTConfig, rank: int, alpha: float, seed: int = 123) -> GPTModel:
    """One of MEMORY_MODELS: the classifier of shape `cfg` with LoRA, its base in float32 or (QLoRA) in NF4,
    built one block at a time."""
    torch.manual_seed(seed)
    qlora = name.startswith("QLoRA")
    with torch.device("meta"):
        model = GPTModel(cfg)
    for block in model.blocks:
        random_init(block)
        if qlora:
            nf4.quantize_linears(block)  # this block's float32 weights are freed here
    for part in (model.tok_emb, model.pos_emb, model.final_norm):
        random_init(part)
    add_classification_head(model, num_classes=2, seed=seed)
    config = dataclasses.replace(CLASSIFIER_LORA, rank=rank, alpha=alpha)
    prepare_for_method(model, "qlora" if qlora else "lora", config, seed=seed)  # qlora: the base is NF4
    model.checkpointing = name.endswith("checkpointing")
    return model.train()


def _measure_own_memory(args: argparse.Namespace) -> None:
    cfg = GPTConfig.from_preset(args.preset)
    step = train_step(build(args.memory_of, cfg, args.rank, args.alpha), precision=args.precision, fused=True)
    batch = random_batch(args.batch_size, args.tokens, cfg.vocab_size)
    step(batch)  # warm-up: AdamW's state exists from here on
    before_mb, process_mb = process_memory_mb("VmRSS"), process_memory_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step(batch)
    step_mb = process_memory_mb("VmHWM")
    print(json.dumps({"step_peak_mb": step_mb, "before_step_mb": before_mb,
                      "process_peak_mb": max(process_mb, step_mb)}))


def peak_memory(name: str, precision: str, args: argparse.Namespace) -> dict[str, float]:
    """The memory figures of `name` trained in `precision`, measured in a fresh process."""
    command = [sys.executable, __file__, "--memory-of", name, "--precision", precision, "--preset",
               args.preset, "--batch-size", str(args.batch_size), "--tokens", str(args.tokens), "--rank",
               str(args.rank), "--alpha", str(args.alpha)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    print(f"memory of {name}, {precision}: {figures}", file=sys.stderr, flush=True)  # progress of a long run
    return figures


def step_times(cfg: GPTConfig, args: argparse.Namespace, precision: str) -> dict[str, list[float]]:
    """Seconds of each of TIMED_MODELS' training steps, per round, the models stepping in turn."""
    lora = build("LoRA", cfg, args.rank, args.alpha)
    qlora = build("QLoRA", cfg, args.rank, args.alpha)
    batch = random_batch(args.batch_size, args.tokens, cfg.vocab_size)
    lora_step = train_step(lora, precision=precision, fused=True)
    qlora_step = train_step(qlora, precision=precision, fused=True)

    def qlora_checkpointed() -> float:  # the same 4-bit model, recomputing each block in backward
        qlora.checkpointing = True
        try:
            return qlora_step(batch)
        finally:
            qlora.checkpointing = False

    steps = {"LoRA": lambda: lora_step(batch), "QLoRA": lambda: qlora_step(batch),
             "QLoRA + checkpointing": qlora_checkpointed}
    times, _ = times_in_turn(steps, args.warmup, args.repeats)
    print(f"step times, {precision}: {times}", file=sys.stderr, flush=True)
    return times


def step_profile(name: str, cfg: GPTConfig, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of one fp32 training step of `name` (after a warm-up step): dequantization in forward and in
    backward, matrix products, the rest (self CPU time of the operators)."""
    step = train_step(build(name, cfg, args.rank, args.alpha), fused=True)
    batch = random_batch(args.batch_size, args.tokens, cfg.vocab_size)
    step(batch)
    dequantize = nf4.LinearNF4.dequantize

    def labelled(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        with record_function(DEQUANTIZE):
            return dequantize(self, dtype)

    nf4.LinearNF4.dequantize = labelled
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batch)
    finally:
        nf4.LinearNF4.dequantize = dequantize
    events = prof.events()
    total = sum(event.self_cpu_time_total for event in events) / 1e6
    seconds = {"dequantization in forward": 0.0, "dequantization in backward": 0.0}
    for event in (e for e in events if e.name == DEQUANTIZE):
        parent = event.cpu_parent
        while parent is not None and "Backward" not in parent.name:
            parent = parent.cpu_parent
        part = "forward" if parent is None else "backward"
        seconds[f"dequantization in {part}"] += event.cpu_time_total / 1e6
    seconds["matrix products"] = sum(e.self_cpu_time_total for e in events if e.name in MATMUL_OPS) / 1e6
    seconds["the rest"] = total - sum(seconds.values())
    seconds["total"] = total
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(parser, repeats=3)
    parser.set_defaults(preset="gpt2-large", warmup=1)
    parser.add_argument("--memory-of", choices=MEMORY_MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args, command = parse_step_args(parser, argv, "bench_qlora.py")
    if args.memory_of:
        _measure_own_memory(args)
        return {}
    cfg = GPTConfig.from_preset(args.preset)
    precisions = ("fp32", "bf16") if device_supports("bf16", torch.device("cpu")) else ("fp32",)
    measured = MEMORY_MODELS
    if args.smoke:  # fp32, and the memory of LoRA and QLoRA only
        precisions, measured = ("fp32",), MEMORY_MODELS[::2]
    memory = {precision: {name: peak_memory(name, precision, args) for name in measured}
              for precision in precisions}
    times = {precision: step_times(cfg, args, precision) for precision in precisions}
    ratios = {precision: {name: median_ratio(t[name], t["LoRA"]) for name in TIMED_MODELS[1:]}
              for precision, t in times.items()}
    profiles = {name: step_profile(name, cfg, args) for name in TIMED_MODELS}
    results = {"memory": memory, "step_times": times, "ratios": ratios, "profile_s": profiles,
               "step_s": {p: medians(t) for p, t in times.items()}}
    print(report(results, args, command))
    return results


def report(r: dict, args: argparse.Namespace, command: str) -> str:
    memory, step_s = r["memory"], r["step_s"]
    lines = [
        f"Machine: {machine_description()}", f"Command: `{command.strip()}`", "",
        f"One training step of a {args.preset}-shaped classifier, batch {args.batch_size} x {args.tokens} "
        f"tokens, LoRA rank {args.rank} on every Linear of the blocks, the head trained.", "",
        "Peak resident memory of a training step, each model in a fresh process (VmHWM reset after a "
        "warm-up step):", "",
        "| model, precision | step peak | resident before the step | process peak (building included) |",
        "|---|---:|---:|---:|",
    ]
    for precision, models in memory.items():
        lines += [f"| {name}, {precision} | {m['step_peak_mb']:,.0f} MB | {m['before_step_mb']:,.0f} MB | "
                  f"{m['process_peak_mb']:,.0f} MB |" for name, m in models.items()]
    lines += ["", "| step peak, ratio | value |", "|---|---:|"]
    for precision, models in memory.items():
        peak = {name: m["step_peak_mb"] for name, m in models.items()}
        lines += [f"| {q} / {lo}, {precision} | {peak[q] / peak[lo]:.2f} |"
                  for q in peak for lo in peak if q.startswith("QLoRA") and lo.startswith("LoRA")]
    lines += ["", f"Step time (median of {args.repeats} rounds after {args.warmup} warm-up, the models "
              "stepping in turn):", "",
              "| model (precision) | step time | / LoRA (median of per-round ratios) |", "|---|---:|---:|"]
    for precision, models in step_s.items():
        lines += [f"| {name} ({precision}) | {seconds:.3f} s | "
                  f"{'-' if name == 'LoRA' else format(r['ratios'][precision][name], '.2f')} |"
                  for name, seconds in models.items()]
    lines += ["", "Where the time of one fp32 step goes (torch.profiler, self CPU time; with checkpointing, "
              "backward includes the forward it recomputes):", "",
              "| part | " + " | ".join(TIMED_MODELS) + " |", "|---|" + "---:|" * len(TIMED_MODELS)]
    profiles = r["profile_s"]
    lines += [f"| {part} | " + " | ".join(f"{profiles[name][part]:.3f} s" for name in TIMED_MODELS) + " |"
              for part in profiles["LoRA"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
