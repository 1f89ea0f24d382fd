"""Speed of one language-model training step: our GPTModel against Hugging Face's GPT2LMHeadModel.

    python benchmarks/bench_pretrain.py            # gpt2-small shape, batch 8 x 256 tokens (RESULTS.md)
    python benchmarks/bench_pretrain.py --smoke    # tiny shape, a few steps (what CI runs)

One step: forward, cross-entropy over the whole 50,257-token vocabulary at every position, backward, AdamW
over every parameter. Both models start from the same random weights (bench_generate's pair) and train on
the same batch; they step in turn (A, B, A, B, ...) so that a busy moment of the machine slows both alike,
and the table shows medians after a warm-up. Their losses are printed step by step: the same weights and
the same maths must give the same numbers, which shows that both steps do the same work.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_finetune import matmul_gflops, training_flops  # benchmarks/ is on the path when run as a script
from bench_generate import same_weights_models
from common import machine_description, medians, times_in_turn

from llm_scratch.config import PRESETS
from llm_scratch.language_model import next_token_loss
from llm_scratch.model import count_parameters

MODELS = ("ours", "hf")
LABELS = {"ours": "ours (`GPTModel`)", "hf": "Hugging Face `GPT2LMHeadModel`"}


def lm_train_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], float]:
    """One AdamW step of `model` on the next-token loss of `batch` (inputs, targets); returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ours = hasattr(model, "blocks")
    inputs, targets = batch

    def step() -> float:
        if ours:
            loss = next_token_loss(model, batch)
        else:  # the same loss on Hugging Face's logits (its `labels=` would shift the targets itself)
            logits = model(input_ids=inputs).logits  # (batch, n_tokens, vocab_size)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def lm_training_flops(preset: str, batch_size: int, n_tokens: int) -> float:
    """Matmul FLOPs of one step: bench_finetune's count, with the vocabulary head instead of 2 classes."""
    cfg = PRESETS[preset]
    head = 3 * 2 * batch_size * n_tokens * cfg.emb_dim * (cfg.vocab_size - 2)
    return training_flops(cfg, batch_size, n_tokens) + head


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-small", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, batch 2 x 16 tokens, 3 steps (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.batch_size, args.tokens, args.warmup, args.repeats = "tiny", 2, 16, 1, 2
    command = "python benchmarks/bench_pretrain.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    hf, ours = same_weights_models(args.preset, args.seed)
    models = {"ours": ours.train(), "hf": hf.train()}
    parameters = {name: count_parameters(model) for name, model in models.items()}
    torch.manual_seed(args.seed)
    ids = torch.randint(0, PRESETS[args.preset].vocab_size, (args.batch_size, args.tokens + 1))
    batch = (ids[:, :-1], ids[:, 1:])  # (batch, n_tokens) each: the targets are the inputs moved by one
    steps = {name: lm_train_step(model, batch) for name, model in models.items()}
    seconds, losses = times_in_turn(steps, args.warmup, args.repeats)
    step_s = medians(seconds)
    del models, steps, hf, ours
    matmul = matmul_gflops(256 if args.smoke else 2048, repeats=3 if args.smoke else 10)
    achieved = lm_training_flops(args.preset, args.batch_size, args.tokens) / step_s["ours"] / 1e9
    results = {"step_s": step_s, "seconds": seconds, "losses": losses, "parameters": parameters,
               "tokens_per_step": args.batch_size * args.tokens, "matmul_gflops": matmul,
               "step_gflops": achieved}
    print(report(results, args, command))
    return results


def report(r: dict, args: argparse.Namespace, command: str) -> str:
    s, tokens = r["step_s"], r["tokens_per_step"]
    lines = [
        f"Machine: {machine_description()}",
        f"Command: `{command.strip()}`",
        "",
        f"Language-model training step, {args.preset} shape ({r['parameters']['ours']:,} parameters), batch "
        f"{args.batch_size} x {args.tokens} tokens, cross-entropy over the whole vocabulary, AdamW over all "
        f"parameters (median of {args.repeats} after {args.warmup} warm-up, the models stepping in turn):",
        "",
        "| model | step time | tokens/s | all timed steps (s) |",
        "|---|---:|---:|---|",
        *(f"| {LABELS[name]} | {s[name]:.3f} s | {tokens / s[name]:,.0f} | "
          f"{', '.join(f'{x:.2f}' for x in r['seconds'][name])} |" for name in MODELS),
        "",
        "| ratio | value |",
        "|---|---:|",
        f"| ours / Hugging Face (step time) | {s['ours'] / s['hf']:.2f} |",
        f"| our step: {r['step_gflops']:.1f} GFLOP/s / plain fp32 matmul {r['matmul_gflops']:.1f} GFLOP/s | "
        f"{r['step_gflops'] / r['matmul_gflops']:.2f} |",
        "",
        "Loss at each step (same weights, same batch):",
        "",
        "| step | " + " | ".join(LABELS[name] for name in MODELS) + " |",
        "|---:|" + "---:|" * len(MODELS),
        *(f"| {i + 1} | " + " | ".join(f"{r['losses'][name][i]:.5f}" for name in MODELS) + " |"
          for i in range(len(r["losses"]["ours"]))),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
