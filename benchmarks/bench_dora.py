"""DoRA and LoRA+ training steps: ours against Hugging Face + PEFT's DoRA, and LoRA+ against plain LoRA.

    python benchmarks/bench_dora.py             # the table in benchmarks/RESULTS.md (gpt2-small shape)
    python benchmarks/bench_dora.py --smoke     # tiny shape and a few steps (what CI runs)

The same 2-class classifier as bench_finetune.py (random weights, batch 8 x 120 tokens, rank 16 on every
Linear of the blocks, the head trained), built by its `build`. The four models step in turn (A, B, C, D,
A, ...) so that a busy moment of a shared machine slows them alike; times are medians after a warm-up, and
each ratio is the median of its per-round ratios (the two steps of a round ran seconds apart, under the same
load). The LoRA+ model is our LoRA model with B's learning rate 16 times A's: the same work per step. Peak
memory is measured in a fresh process per model, as in bench_finetune.py.
"""

from __future__ import annotations

import argparse

from bench_finetune import (  # benchmarks/ is on the path when run as a script
    add_step_options,
    build,
    parse_step_args,
    peak_memory_mb,
    random_batch,
    step_table,
    train_step,
)
from common import median_ratio, medians, times_in_turn

from llm_scratch.config import GPTConfig
from llm_scratch.loraplus import loraplus_param_groups

MODELS = ("ours dora", "hf+peft dora", "ours lora", "ours lora+")
RATIOS = {  # the step-time ratios reported
    "ours DoRA / HF + PEFT DoRA": ("ours dora", "hf+peft dora"),
    "ours LoRA+ / ours LoRA": ("ours lora+", "ours lora"),
    "ours DoRA / ours LoRA": ("ours dora", "ours lora"),
}
LORAPLUS_RATIO = 16.0
LR = 1e-5  # bench_finetune's train_step rate; LoRA+ gives B 16 times this


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(parser, repeats=15)
    args, command = parse_step_args(parser, argv, "bench_dora.py")
    cfg = GPTConfig.from_preset(args.preset)
    batch = random_batch(args.batch_size, args.tokens, cfg.vocab_size)

    models = {name: build(name.removesuffix("+"), cfg, args.rank, args.alpha) for name in MODELS}
    groups = loraplus_param_groups(models["ours lora+"], lr=LR, loraplus_lr_ratio=LORAPLUS_RATIO)
    steps = {name: train_step(model, groups if name == "ours lora+" else None)
             for name, model in models.items()}
    trainable = {name: sum(p.numel() for p in model.parameters() if p.requires_grad)
                 for name, model in models.items()}
    times, _ = times_in_turn({name: (lambda step=step: step(batch)) for name, step in steps.items()},
                             args.warmup, args.repeats)
    del models, steps
    step_s = medians(times)
    ratios = {row: median_ratio(times[top], times[bottom]) for row, (top, bottom) in RATIOS.items()}
    memory = {name: peak_memory_mb(name, args) for name in MODELS[:2]}
    results = {"step_s": step_s, "step_times": times, "ratios": ratios, "peak_mb": memory,
               "trainable": trainable, "loraplus_lrs": sorted({group["lr"] for group in groups})}
    print(report(results, args, command))
    return results


def report(r: dict, args: argparse.Namespace, command: str) -> str:
    m = r["peak_mb"]
    setting = (f"the four stepping in turn; rank {args.rank}, alpha {args.alpha:g}; "
               f"LoRA+ ratio {LORAPLUS_RATIO:g}")
    return "\n".join([
        *step_table(MODELS, r["step_s"], m, args, command, setting),
        *(f"| {row} (step time, median of per-round ratios) | {value:.2f} |"
          for row, value in r["ratios"].items()),
        f"| ours DoRA / HF + PEFT DoRA (peak memory) | {m['ours dora'] / m['hf+peft dora']:.2f} |",
    ])


if __name__ == "__main__":
    main()
