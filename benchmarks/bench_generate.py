"""Generation speed: our GPTModel without and with the KV cache, and Hugging Face `generate`, same weights.

A random Hugging Face GPT-2 of the chosen shape is saved as safetensors and loaded into `GPTModel` through
`llm_scratch.pretrained.load_gpt2`, so both models hold the same weights. Each method then makes the same
greedy continuation of one random prompt; the methods take turns so that a noisy machine slows them alike,
and the table shows medians over the repeats after one warm-up run each.

    python benchmarks/bench_generate.py                # gpt2-small shape, 10-token prompt, 200 new tokens
    python benchmarks/bench_generate.py --cached-only  # ours with the cache against Hugging Face only
    python benchmarks/bench_generate.py --smoke        # tiny shape, a few tokens: checks that it runs (CI)

The table made by hand, with its command and machine, is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import machine_description, median_ratio, times_in_turn  # benchmarks/ is on the path

from llm_scratch import PRESETS, generate
from llm_scratch.pretrained import load_gpt2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", choices=list(PRESETS), help="model shape")
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens to generate per run")
    parser.add_argument("--prompt-tokens", type=int, default=10, help="length of the random prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (after a warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt")
    parser.add_argument("--cached-only", action="store_true",
                        help="leave out the slow generation without a cache (ours with the cache and "
                             "Hugging Face alternate)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, 8 new tokens, 1 repeat: only checks that everything runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.new_tokens, args.prompt_tokens, args.repeats = "tiny", 8, 4, 1
    for name in ("new_tokens", "prompt_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompt_tokens + args.new_tokens > PRESETS[args.preset].context_length:
        parser.error(f"--prompt-tokens + --new-tokens must fit the context length of {args.preset} "
                     f"({PRESETS[args.preset].context_length})")
    return args


def same_weights_models(preset: str, seed: int):
    """A random `transformers.GPT2LMHeadModel` of the preset's shape, and a `GPTModel` with its weights."""
    from transformers import GPT2Config, GPT2LMHeadModel  # a test-only dependency: imported when needed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of the output

    cfg = PRESETS[preset]
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # No end-of-text token: every method must produce exactly --new-tokens tokens, none may stop early.
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder, safe_serialization=True)
        ours = load_gpt2(preset, weights_path=Path(folder) / "model.safetensors")
    return hf, ours.eval()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a markdown table; return the tokens per second and whether tokens match."""
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another process, e.g. a test


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Time the three methods on `args.threads` threads, print the table, return what main returns."""
    hf, ours = same_weights_models(args.preset, args.seed)
    n_new, cfg = args.new_tokens, ours.cfg
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), generator=generator)  # (1, n_prompt)

    def hf_generate(n: int) -> torch.Tensor:
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, use_cache=True)

    methods: dict[str, Callable[[int], torch.Tensor]] = {
        "ours, no cache": lambda n: generate(ours, prompt, n, cfg.context_length, use_cache=False),
        "ours, KV cache": lambda n: generate(ours, prompt, n, cfg.context_length, use_cache=True),
        "Hugging Face generate (its cache)": hf_generate,
    }
    if args.cached_only:
        del methods["ours, no cache"]
    names = list(methods)
    with torch.no_grad():
        for name in names:  # warm-up: first calls allocate memory and start threads
            methods[name](min(n_new, 10))
        seconds, outputs = times_in_turn({name: lambda m=methods[name]: m(n_new) for name in names}, warmup=0,
                                         repeats=args.repeats)
    tokens = {name: outs[-1] for name, outs in outputs.items()}
    reference = tokens[names[0]]
    match = {name: torch.equal(out, reference) for name, out in tokens.items()}
    tokens_match = all(match.values()) and reference.shape == (1, args.prompt_tokens + n_new)
    speed = {name: n_new / statistics.median(times) for name, times in seconds.items()}

    command = "python benchmarks/bench_generate.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"\nGreedy generation of {n_new} new tokens after a {args.prompt_tokens}-token prompt, "
          f"{args.preset} shape, batch 1, float32, CPU; median of {args.repeats} runs after a warm-up.\n")
    header = ("method", "tokens/s", "seconds per run (median)", "all runs (s)", f"vs {names[0]}",
              "same tokens")
    print("| " + " | ".join(header) + " |\n|---|---:|---:|---|---:|---|")
    base = speed[names[0]]
    for name in names:
        runs = ", ".join(f"{t:.2f}" for t in seconds[name])
        print(f"| {name} | {speed[name]:.1f} | {statistics.median(seconds[name]):.2f} | {runs} | "
              f"{speed[name] / base:.2f}x | {'yes' if match[name] else 'NO'} |")
    cached, hf_name = "ours, KV cache", "Hugging Face generate (its cache)"
    per_round = median_ratio(seconds[hf_name], seconds[cached])
    print(f"\nours with KV cache / Hugging Face generate: {speed[cached] / speed[hf_name]:.2f}x (ratio of "
          f"the medians); {per_round:.2f}x (median of the per-run ratios)")
    print(f"\nMachine: {machine_description()}  ")
    print(f"Command: `{command.strip()}`")
    print(f"\ngreedy tokens of all {len(names)} methods identical: {tokens_match}")
    return {"tokens_per_second": speed, "seconds": seconds, "tokens_match": tokens_match}


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["tokens_match"] else 1)
