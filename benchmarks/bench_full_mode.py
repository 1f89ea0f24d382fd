"""Full-mode time of the notebooks on this CPU: the ones that download nothing run whole; notebook 05 (and
its solutions) and notebook 03 are estimated from a short measured part, since they need GPT-2's weights.

    python benchmarks/bench_full_mode.py    # the collection from the data cache, or --data-path FILE

Notebook 05's estimate: a gpt2-small-shaped classifier (random weights: a step costs the same whatever their
values) takes training steps on the first batches of the real balanced training split, LoRA, last-block and
full in turn, and the same batches are evaluated without gradients. Their seconds per padded position, times
the positions the notebook computes (5 epochs, its evaluations, from its settings), give its time. On a
machine other jobs share, every step is slowed, but the methods stepping in turn are slowed alike: so
`--lora-epoch-seconds S`, a whole LoRA epoch timed when the machine was free (`bench_finetune.py`'s padding
table, dynamic padding), scales every estimate by S / the LoRA epoch estimated here. Notebook 03's estimate:
loading a local gpt2-small file, and its generation cell. Downloads are never included.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_notebooks import NOTEBOOK_DIR, run_notebook_quick
from common import machine_description, sms_spam_file

from llm_scratch import GPTConfig, GPTModel, generate
from llm_scratch.classifier import add_classification_head, classification_loss
from llm_scratch.data import load_spam_splits, spam_dataloaders
from llm_scratch.finetune import METHODS, prepare_for_method
from llm_scratch.pretrained import load_gpt2, save_gpt2_safetensors

WHOLE = ["01_gpt_from_scratch.ipynb", "04_lora_from_scratch.ipynb",  # full mode without any download
         "solutions/01_gpt_from_scratch_solutions.ipynb", "solutions/04_lora_from_scratch_solutions.ipynb"]
EPOCHS, BATCH, EVAL_EVERY, EVAL_BATCHES = 5, 8, 50, 5  # notebook 05's settings in full mode
LORA_EPOCH = "one LoRA training epoch, no evaluation"


def step_seconds(models: dict, batches: list) -> tuple[dict[str, float], float]:
    """Seconds per padded position of a training step of each model, and of an evaluation batch: medians
    over `batches` (the first one warms up). The models step in turn, batch by batch, in a new order each
    time, so that other work on the machine slows them alike; the median passes over its bursts.
    """
    optimizers = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
                  for m, model in models.items()}
    times: dict[str, list[float]] = {m: [] for m in [*models, "evaluate"]}
    for index, batch in enumerate(batches):
        for method in random.Random(index).sample(list(times), len(times)):
            start = time.perf_counter()
            if method == "evaluate":
                with torch.no_grad():
                    classification_loss(models["lora"].eval(), batch)
            else:
                optimizers[method].zero_grad()
                classification_loss(models[method].train(), batch).backward()
                optimizers[method].step()
            if index > 0:
                times[method].append((time.perf_counter() - start) / batch.input_ids.numel())
    per_position = {m: statistics.median(t) for m, t in times.items()}
    return {m: per_position[m] for m in models}, per_position["evaluate"]


def notebook_05(data_path: Path, n_batches: int) -> dict[str, float]:
    """Estimated seconds of notebook 05's parts in full mode, and of its solutions (one LoRA epoch)."""
    splits = load_spam_splits(data_path=data_path, seed=123)
    loaders = spam_dataloaders(splits, batch_size=BATCH, seed=123)
    positions = {name: sum(b.input_ids.numel() for b in loader) for name, loader in zip(
        ("train", "validation", "test"), loaders[:3], strict=True)}
    torch.manual_seed(123)
    base = add_classification_head(GPTModel(GPTConfig.from_preset("gpt2-small")))
    models = {}
    for method in METHODS:
        models[method] = copy.deepcopy(base)
        prepare_for_method(models[method], method)
    first_batches = [batch for batch, _ in zip(loaders.train, range(n_batches), strict=False)]
    per_step, per_eval = step_seconds(models, first_batches)

    steps = EPOCHS * len(loaders.train)
    mean_batch = positions["train"] / len(loaders.train)  # padded positions of an average training batch
    during = (steps // EVAL_EVERY * 2 * EVAL_BATCHES + EPOCHS * EVAL_BATCHES) * mean_batch \
        + EPOCHS * positions["validation"]  # loss checks, then each epoch's accuracies
    every_split = sum(positions.values())  # evaluate() on the three splits
    train = {m: steps * mean_batch * per_step[m] + during * per_eval for m in METHODS}
    return {
        LORA_EPOCH: positions["train"] * per_step["lora"],
        "LoRA, 5 epochs (section 6)": train["lora"],
        "last block, 5 epochs (section 9)": train["last-block"] + every_split * per_eval,
        "full fine-tuning, 5 epochs (WITH_FULL)": train["full"] + every_split * per_eval,
        "evaluations of sections 5, 6 and 8": (2 * every_split + 2 * positions["test"]) * per_eval,
        "solutions 05: one LoRA epoch + evaluations": train["lora"] / EPOCHS + 2 * every_split * per_eval,
    }


def notebook_03() -> dict[str, float]:
    """Seconds of notebook 03's slow cells with a local gpt2-small file: loading it, and generating."""
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(123)
        random_small = GPTModel(GPTConfig.from_preset("gpt2-small"))
        path = save_gpt2_safetensors(random_small, Path(folder) / "model.safetensors")
        start = time.perf_counter()
        model = load_gpt2("gpt2-small", weights_path=path)
        loaded = time.perf_counter() - start
    start = time.perf_counter()
    untrained = GPTModel(model.cfg).eval()
    ids = torch.tensor([[6109, 3626, 6100, 345]])  # "Every effort moves you"
    with torch.no_grad():
        for m in (model, untrained):
            generate(m, ids, max_new_tokens=25, context_size=1024)
            m(ids)
    return {"load_gpt2 from the cache": loaded, "generation cell": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=Path, default=sms_spam_file(),
                        help="the SMSSpamCollection file or UCI zip (default: the data cache's copy)")
    parser.add_argument("--batches", type=int, default=7, help="training batches timed per method, the "
                                                               "first one as warm-up (default 7)")
    parser.add_argument("--skip-whole", action="store_true", help="do not run notebooks 01 and 04 whole")
    parser.add_argument("--lora-epoch-seconds", type=float,
                        help="a whole LoRA epoch (dynamic padding) timed on a free machine, to scale by")
    args = parser.parse_args()
    seconds = {}
    if not args.skip_whole:
        for name in WHOLE:
            with tempfile.TemporaryDirectory() as workdir:
                seconds[f"{name}, whole, full mode"] = run_notebook_quick(NOTEBOOK_DIR / name, Path(workdir),
                                                                          quick=False)
            print(f"{name}: {seconds[f'{name}, whole, full mode']:.0f} s", file=sys.stderr, flush=True)
    seconds.update({f"03: {k}": v for k, v in notebook_03().items()})
    load = os.getloadavg()[0]
    estimated = notebook_05(args.data_path, args.batches)
    scale = args.lora_epoch_seconds / estimated[LORA_EPOCH] if args.lora_epoch_seconds else None
    print(f"\nMachine: {machine_description()}; load average {load:.1f} before notebook 05's part, "
          f"{os.getloadavg()[0]:.1f} after it  ")
    print(f"Command: `python benchmarks/bench_full_mode.py {' '.join(sys.argv[1:])}`\n")
    print("| notebook part (full mode, gpt2-small) | measured now | scaled to a free machine |\n"
          "|---|---:|---:|")
    for name, value in seconds.items():
        print(f"| {name} | {value / 60:,.1f} min | |")
    for name, value in estimated.items():
        scaled = f"{scale * value / 60:,.1f} min" if scale else ""
        print(f"| 05: {name} | {value / 60:,.1f} min | {scaled} |")


if __name__ == "__main__":
    main()
