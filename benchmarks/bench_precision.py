"""Mixed precision on this CPU: the classifier's training step in fp32 and in bf16, and where an fp32 step's
time goes.

    python benchmarks/bench_precision.py              # gpt2-small shape, batch 8 x 120 tokens (about 10 min)
    python benchmarks/bench_precision.py --smoke      # tiny shapes, a few steps (what CI runs)

The fp32 and bf16 models (same random weights) take training steps in turn, and each ratio is the median of
the per-round ratios, so a busy moment of the machine slows both sides of a ratio alike. The profile is
`torch.profiler` on one full fine-tuning step in fp32: the time in matrix products against the rest.
"""

from __future__ import annotations

import argparse

import torch
from bench_finetune import (  # benchmarks/ is on the path when run as a script
    add_step_options,
    build,
    matmul_gflops,
    parse_step_args,
    random_batch,
    train_step,
    training_flops,
)
from common import machine_description, median_ratio, medians, times_in_turn
from torch.profiler import ProfilerActivity, profile

from llm_scratch.config import GPTConfig
from llm_scratch.precision import device_supports

# The operators that are matrix products (the rest is normalization, activation, softmax, copies, AdamW, ...).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::mkldnn_linear")


def matmul_gflops_of(dtype: torch.dtype, n: int, repeats: int) -> float:
    """A plain (n x n) @ (n x n) matmul in `dtype`, GFLOP/s (median)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times, _ = times_in_turn({"mm": lambda: a @ b}, warmup=2, repeats=repeats)
    return 2 * n**3 / medians(times)["mm"] / 1e9


def step_profile(cfg: GPTConfig, args: argparse.Namespace) -> dict[str, float]:
    """Self CPU seconds per operator of one full fp32 training step (after a warm-up step)."""
    step = train_step(build("ours full", cfg, args.rank, args.alpha), fused=True)
    batch = random_batch(args.batch_size, args.tokens, cfg.vocab_size)
    step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    return {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(parser, repeats=7)
    args, command = parse_step_args(parser, argv, "bench_precision.py")
    if not device_supports("bf16", torch.device("cpu")):
        raise SystemExit("this CPU has no bfloat16 arithmetic: nothing to compare")
    cfg = GPTConfig.from_preset(args.preset)
    batch = random_batch(args.batch_size, args.tokens, cfg.vocab_size)

    steps = {f"{method} {precision}": train_step(build(f"ours {method}", cfg, args.rank, args.alpha),
                                                 precision=precision, fused=True)
             for method in ("lora", "full") for precision in ("fp32", "bf16")}
    times, _ = times_in_turn({name: (lambda s=s: s(batch)) for name, s in steps.items()},
                             args.warmup, args.repeats)
    del steps
    ratios = {m: median_ratio(times[f"{m} bf16"], times[f"{m} fp32"]) for m in ("lora", "full")}
    n = 256 if args.smoke else 2048
    matmul = {"fp32": matmul_gflops(n, args.repeats),
              "bf16": matmul_gflops_of(torch.bfloat16, n, args.repeats)}
    full_step_s = medians(times)["full fp32"]
    full_gflops = training_flops(cfg, args.batch_size, args.tokens) / full_step_s / 1e9
    seconds = step_profile(cfg, args)
    in_matmul = sum(t for op, t in seconds.items() if op in MATMUL_OPS)
    results = {"step_times": times, "step_s": medians(times),
               "ratios": ratios, "matmul_gflops": matmul, "full_step_gflops": full_gflops,
               "profile_s": seconds, "profile_matmul_share": in_matmul / sum(seconds.values())}
    print(report(results, args, command))
    return results


def report(r: dict, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"Machine: {machine_description()}", f"Command: `{command.strip()}`", "",
        f"Training step of a {args.preset}-shaped classifier, batch {args.batch_size} x {args.tokens} tokens "
        f"(median of {args.repeats} after {args.warmup} warm-up, the four stepping in turn):", "",
        "| method | fp32 step | bf16 step | bf16 / fp32 (median of per-round ratios) |",
        "|---|---:|---:|---:|",
        *(f"| {m} | {r['step_s'][f'{m} fp32']:.3f} s | {r['step_s'][f'{m} bf16']:.3f} s | "
          f"{r['ratios'][m]:.2f} |" for m in ("lora", "full")), "",
        f"Plain 2048 x 2048 matmul: fp32 {r['matmul_gflops']['fp32']:.1f} GFLOP/s, bf16 "
        f"{r['matmul_gflops']['bf16']:.1f} GFLOP/s. Full fp32 step: {r['full_step_gflops']:.1f} GFLOP/s, "
        f"{r['full_step_gflops'] / r['matmul_gflops']['fp32']:.2f} of the plain fp32 matmul.", "",
        f"Profile of one full fp32 step: {r['profile_matmul_share']:.0%} of the CPU time in matrix products. "
        "The largest operators (self CPU time):", "",
        "| operator | seconds | share |", "|---|---:|---:|",
    ]
    total = sum(r["profile_s"].values())
    top = sorted(r["profile_s"].items(), key=lambda item: -item[1])[:12]
    lines += [f"| `{op}` | {t:.3f} | {t / total:.1%} |" for op, t in top]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
