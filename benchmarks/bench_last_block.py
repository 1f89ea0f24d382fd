"""One last-block epoch: every block at every step (ordinary) against the frozen prefix computed once.

    python benchmarks/bench_last_block.py --data-path PATH/SMSSpamCollection  # gpt2-small, the real split
    python benchmarks/bench_last_block.py --smoke    # tiny shape, quick mode's messages (what CI runs)

Last-block fine-tuning freezes the embeddings and every block but the last, without dropout, so their outputs
are the same at every epoch: `llm_scratch.frozen_prefix` computes them once per message and trains the rest
on them. An epoch here is what `finetune` spends per epoch: the training steps and the loop's evaluations
(every `--eval-every` steps on a few batches, and at the epoch's end on the whole validation set). The model
has GPT-2's shape and random weights (the speed of a step does not depend on their values). Both paths start
from the same weights and see the same batches, so their step losses must agree up to float rounding; the
table shows the largest difference. Each round times the cache, then both epochs (in alternating order);
the table shows medians over the rounds.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys

import torch
from common import machine_description  # benchmarks/ is on the path when run as a script

from llm_scratch.classifier import add_classification_head, train_classifier
from llm_scratch.config import PRESETS, GPTConfig, pick_device
from llm_scratch.data import load_spam_splits, spam_dataloaders
from llm_scratch.finetune import EPOCHS
from llm_scratch.frozen_prefix import skip_frozen_prefix
from llm_scratch.methods import LEARNING_RATES, prepare_for_method
from llm_scratch.model import GPTModel

PATHS = ("ordinary", "cached")
LABELS = {"ordinary": "ordinary: every block at every step",
          "cached": "cached: the frozen prefix computed once"}


def one_round(base: GPTModel, splits, args: argparse.Namespace, device: torch.device,
              cached_first: bool) -> dict:
    """One epoch on each path from the same start (fresh loaders, same seed), and the cache's cost; only
    numbers come back, so that the models of a round are freed before the next."""
    common = dict(batch_size=args.batch_size, context_length=base.cfg.context_length, bucket=args.bucket,
                  seed=args.seed)
    ordinary_model = copy.deepcopy(base).to(device)
    ordinary_loaders = spam_dataloaders(splits, **common)
    prefix = skip_frozen_prefix(copy.deepcopy(base).to(device), spam_dataloaders(splits, **common))
    runs = {"ordinary": (ordinary_model, ordinary_loaders), "cached": (prefix.model, prefix.loaders)}
    settings = dict(epochs=1, lr=args.lr, eval_every=args.eval_every, seed=args.seed, device=device,
                    progress=False)
    histories = {}
    for name in (PATHS[::-1] if cached_first else PATHS):
        model, loaders = runs[name]
        histories[name] = train_classifier(model, loaders.train, loaders.validation, **settings)
    return {"epoch_s": {name: h.wall_time_s for name, h in histories.items()},
            "step_loss": {name: h.step_loss for name, h in histories.items()},
            "cache_s": prefix.seconds, "cache_mb": prefix.megabytes, "n_blocks": prefix.n_blocks,
            "messages": sum(len(loader.dataset) for loader in prefix.loaders[:3])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-small", choices=list(PRESETS))
    parser.add_argument("--data-path", default=None,
                        help="the SMSSpamCollection file or UCI zip; default: quick mode's shipped messages")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bucket", action="store_true", help="length-bucketed batches")
    parser.add_argument("--eval-every", type=int, default=50, help="training steps between two checks")
    parser.add_argument("--lr", type=float, default=LEARNING_RATES["last-block"])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each: the cache, then both epochs)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps; default: CUDA, then MPS, then CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, quick data, one round (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.data_path, args.eval_every, args.repeats = "tiny", None, 5, 1
    command = "python benchmarks/bench_last_block.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    device = pick_device(args.device)

    if args.data_path is None:
        splits, data = load_spam_splits(quick=True), "quick mode's subset of the SMS Spam Collection"
    else:
        splits, data = load_spam_splits(data_path=args.data_path), "the SMS Spam Collection"
    torch.manual_seed(args.seed)
    base = add_classification_head(GPTModel(GPTConfig.from_preset(args.preset)), seed=args.seed)
    prepare_for_method(base, "last-block")
    rounds = [one_round(base, splits, args, device, cached_first=i % 2 == 1) for i in range(args.repeats)]

    ordinary, cached = (rounds[0]["step_loss"][name] for name in PATHS)  # every round trains the same
    results = {
        "epoch_s": {name: statistics.median(r["epoch_s"][name] for r in rounds) for name in PATHS},
        "cache_s": statistics.median(r["cache_s"] for r in rounds),
        **{key: rounds[0][key] for key in ("cache_mb", "n_blocks", "messages")},
        "n_layers": base.cfg.n_layers, "steps": len(ordinary),
        "train_messages": len(splits.train), "validation_messages": len(splits.validation),
        "loss_difference": max(abs(a - b) for a, b in zip(ordinary, cached, strict=True)),
    }
    print(report(results, args, command, data, device))
    return results


def report(r: dict, args: argparse.Namespace, command: str, data: str, device: torch.device) -> str:
    ordinary, cached = (r["epoch_s"][name] for name in PATHS)
    run_ordinary, run_cached = EPOCHS * ordinary, r["cache_s"] + EPOCHS * cached
    batching = "length-bucketed batches" if args.bucket else "dynamic padding"
    return "\n".join([
        f"Machine: {machine_description()}; device {device}",
        f"Command: `{command.strip()}`",
        "",
        f"One last-block epoch of a {args.preset}-shaped classifier (random weights) on {data}: "
        f"{r['train_messages']:,} training messages, batch {args.batch_size}, {batching}; the loop's "
        f"checks every {args.eval_every} steps and the {r['validation_messages']:,} validation messages at "
        f"the end (median of {args.repeats} round{'s' if args.repeats > 1 else ''}):",
        "",
        "| path | epoch time | speed-up |",
        "|---|---:|---:|",
        f"| {LABELS['ordinary']} | {ordinary:.2f} s | 1.00x |",
        f"| {LABELS['cached']} | {cached:.2f} s | {ordinary / cached:.2f}x |",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| blocks in the cached prefix (with the embeddings) | {r['n_blocks']} of {r['n_layers']} |",
        f"| computing the cache once ({r['messages']:,} messages of the three splits) | "
        f"{r['cache_s']:.2f} s |",
        f"| the cache's memory (fp32, unpadded) | {r['cache_mb']:,.1f} MB |",
        f"| {EPOCHS} epochs (finetune's default), cache included: ordinary / cached | "
        f"{run_ordinary / run_cached:.2f}x |",
        f"| largest step-loss difference ({r['steps']} steps) | {r['loss_difference']:.1e} |",
    ])


if __name__ == "__main__":
    main()
