"""Full-mode time of the notebooks on this CPU: the ones that download nothing run whole; notebooks 05 to 08
(and the solutions of 05 and 06) and notebook 03 are estimated from short measured parts, since they need
GPT-2's weights.

    python benchmarks/bench_full_mode.py    # the collection from the data cache, or --data-path FILE

The estimates of 05 to 08: a gpt2-small-shaped classifier (random weights: a step costs the same whatever
their values) takes training steps on the first batches of the real balanced training split, full,
last-block, LoRA, DoRA and QLoRA (with checkpointing, as `finetune` trains it) in turn, and the same batches
are evaluated without gradients by the LoRA and the QLoRA model. Their seconds per
padded position, times the positions each notebook computes (its epochs, its evaluations, from its settings),
give its time; notebook 05's prompt answers are timed against LoRA steps taken in turn with them, and the
runs on the last block's stored prefix use the speed-up `bench_last_block.py` measured. On a machine other
jobs share, every step is slowed, but the parts timed in turn are slowed alike: so `--lora-epoch-seconds S`, a
whole LoRA epoch timed when the machine was free (`bench_finetune.py`'s padding table, dynamic padding),
scales every estimate by S / the LoRA epoch estimated here. Notebook 03's estimate: loading a local gpt2-small
file, and its generation cell. Downloads are never included.
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

from llm_scratch import GPTConfig, GPTModel, generate, get_tokenizer
from llm_scratch.classifier import add_classification_head, classification_loss
from llm_scratch.data import load_spam_splits, spam_dataloaders
from llm_scratch.finetune import METHODS, prepare_for_method
from llm_scratch.pretrained import load_gpt2, save_gpt2_safetensors

WHOLE = ["01_gpt_from_scratch.ipynb", "04_lora_from_scratch.ipynb",  # full mode without any download
         "solutions/01_gpt_from_scratch_solutions.ipynb", "solutions/04_lora_from_scratch_solutions.ipynb"]
EPOCHS, BATCH, EVAL_EVERY, EVAL_BATCHES = 5, 8, 50, 5  # the settings of notebooks 05 and 06 in full mode
TIMED_STEPS = 10  # notebook 07's timed steps per variant
PROMPT = "Is the following text 'spam'? Answer with 'yes' or 'no'.\n\nText: {text}\nAnswer:"  # notebook 05's
NEW_TOKENS = 3
# Measured on the free machine (RESULTS.md): a last-block epoch on the stored prefix took 18.36 s against
# 92.44 s for an ordinary one (bench_last_block.py); a whole LoRA run in bf16 7 min 30 s against 11 min 32 s.
CACHED_OVER_ORDINARY, BF16_OVER_FP32 = 18.36 / 92.44, 450 / 692
LORA_EPOCH = "one LoRA training epoch, no evaluation"


def step_seconds(models: dict, batches: list) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per padded position of a training step of each model, and of an evaluation batch of the LoRA
    model and (when there is one) the QLoRA model: medians over `batches` (the first one warms up). The models
    step in turn, batch by batch, in a new order each time, so that other work on the machine slows them
    alike; the median passes over its bursts.
    """
    optimizers = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
                  for m, model in models.items()}
    evaluated = [m for m in ("lora", "qlora") if m in models]
    times: dict[str, list[float]] = {m: [] for m in [*models, *(f"evaluate {m}" for m in evaluated)]}
    for index, batch in enumerate(batches):
        for method in random.Random(index).sample(list(times), len(times)):
            start = time.perf_counter()
            if method.startswith("evaluate "):
                with torch.no_grad():
                    classification_loss(models[method.removeprefix("evaluate ")].eval(), batch)
            else:
                optimizers[method].zero_grad()
                classification_loss(models[method].train(), batch).backward()
                optimizers[method].step()
            if index > 0:
                times[method].append((time.perf_counter() - start) / batch.input_ids.numel())
    per_position = {m: statistics.median(t) for m, t in times.items()}
    return {m: per_position[m] for m in models}, {m: per_position[f"evaluate {m}"] for m in evaluated}


def prompt_ratio(lm: GPTModel, lora: GPTModel, batches: list, texts: list[str]) -> float:
    """Notebook 05's prompt answer for one message (greedy, NEW_TOKENS new tokens, the KV cache) over a LoRA
    training step's seconds per padded position: medians over rounds that take one of each in turn."""
    tokenizer = get_tokenizer()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-5)
    answers, steps = [], []
    for index, (batch, text) in enumerate(zip(batches, texts, strict=False)):
        ids = torch.tensor([tokenizer.encode_ordinary(PROMPT.format(text=text))])  # (1, n_tokens)
        for part in random.Random(index).sample(["answer", "step"], 2):
            start = time.perf_counter()
            if part == "answer":
                generate(lm, ids, max_new_tokens=NEW_TOKENS, context_size=lm.cfg.context_length,
                         use_cache=True)
            else:
                optimizer.zero_grad()
                classification_loss(lora.train(), batch).backward()
                optimizer.step()
            seconds = time.perf_counter() - start
            if index > 0:  # the first round warms up
                (answers if part == "answer" else steps).append(
                    seconds if part == "answer" else seconds / batch.input_ids.numel())
    return statistics.median(answers) / statistics.median(steps)


def run_seconds(method: str, positions: dict, train_batches: int, per_step: dict, per_eval: float,
                epochs: int = EPOCHS) -> float:
    """A run of `train_classifier`: its steps, its loss checks every EVAL_EVERY steps and its accuracies
    after each epoch (EVAL_BATCHES batches, and the whole validation set)."""
    steps = epochs * train_batches
    mean_batch = positions["train"] / train_batches  # padded positions of an average training batch
    checks = (steps // EVAL_EVERY * 2 * EVAL_BATCHES + epochs * EVAL_BATCHES) * mean_batch \
        + epochs * positions["validation"]
    return steps * mean_batch * per_step[method] + checks * per_eval


def course_estimates(data_path: Path, n_batches: int) -> tuple[dict[str, float], dict[str, float]]:
    """Estimated seconds of the parts of notebooks 05 to 08 (and the solutions of 05 and 06) in full mode,
    and the measured times per padded position against LoRA's training step."""
    splits = load_spam_splits(data_path=data_path, seed=123)
    loaders = spam_dataloaders(splits, batch_size=BATCH, seed=123)
    names = ("train", "validation", "test")
    positions = {name: sum(b.input_ids.numel() for b in loader)
                 for name, loader in zip(names, loaders[:3], strict=True)}
    bucketed = {**positions, "train": sum(b.input_ids.numel() for b in spam_dataloaders(
        splits, batch_size=BATCH, bucket=True, seed=123).train)}  # notebook 07 buckets its batches
    every_split, train_batches = sum(positions.values()), len(loaders.train)
    torch.manual_seed(123)
    lm = GPTModel(GPTConfig.from_preset("gpt2-small")).eval()
    base = add_classification_head(copy.deepcopy(lm))
    models = {}
    for method in METHODS:
        models[method] = copy.deepcopy(base)
        prepare_for_method(models[method], method)
    models["qlora"].checkpointing = True  # as finetune trains it
    first_batches = [batch for batch, _ in zip(loaders.train, range(n_batches), strict=False)]
    per_step, evaluation = step_seconds(models, first_batches)
    per_eval = evaluation["lora"]
    answer = prompt_ratio(lm, models["lora"], first_batches, [row.text for row in splits.test]) \
        * per_step["lora"]

    run = {m: run_seconds(m, positions, train_batches, per_step, per_eval) for m in METHODS}
    one_epoch = {m: run_seconds(m, bucketed, train_batches, per_step, per_eval, epochs=1) for m in METHODS}
    n_frozen = GPTConfig.from_preset("gpt2-small").n_layers - 1
    prefix = every_split * per_eval * n_frozen / (n_frozen + 1)  # the frozen blocks, once per message
    cached_epoch = CACHED_OVER_ORDINARY * run["last-block"] / EPOCHS
    last_block_finetune = prefix + EPOCHS * cached_epoch
    first_batch = first_batches[0].input_ids.numel()
    against_lora = {**{f"{m} training step": per_step[m] / per_step["lora"] for m in METHODS},
                    **{f"{m} evaluation": evaluation[m] / per_step["lora"] for m in evaluation}}
    return {
        LORA_EPOCH: positions["train"] * per_step["lora"],
        "05: the prompt's answers for the 300 test messages (section 4)": len(splits.test) * answer,
        "05: last block, 5 epochs, its loss checks and accuracies (section 8)": run["last-block"],
        "05: evaluations (validation and test before training, three splits after)":
            (positions["validation"] + positions["test"] + every_split) * per_eval,
        "06: LoRA, 5 epochs, its loss checks and accuracies (section 3)": run["lora"],
        "06: evaluations (three splits; the test split twice in section 4)":
            (every_split + 2 * positions["test"]) * per_eval,
        "06: last block through finetune, the frozen prefix once (section 6)": last_block_finetune,
        "06, optional: full fine-tuning, 5 epochs (WITH_FULL)": run["full"] + every_split * per_eval,
        "06, optional: section 7 (last-block epochs ordinary and cached, the prefix, LoRA fp32 and bf16)":
            run["last-block"] / EPOCHS + prefix + cached_epoch + run["lora"] / EPOCHS * (1 + BF16_OVER_FP32),
        "07: four one-epoch runs, bucketed, and their evaluations (section 3)":
            3 * one_epoch["lora"] + one_epoch["dora"] + 4 * every_split * per_eval,
        "07: the timed steps (section 3)": (1 + TIMED_STEPS) * first_batch * (3 * per_step["lora"]
                                                                             + per_step["dora"]),
        "07: LoRA at rank 4, one epoch, and its evaluations (section 4)": one_epoch["lora"]
            + every_split * per_eval,
        "07, optional: DoRA at rank 4 (WITH_DORA_SWEEP)": one_epoch["dora"] + every_split * per_eval,
        "solutions 05: one last-block epoch through finetune, and the evaluations":
            prefix + cached_epoch + (every_split + positions["test"]) * per_eval,
        "solutions 06: one LoRA epoch through finetune, and the evaluations":
            run["lora"] / EPOCHS + (every_split + 2 * positions["test"]) * per_eval,
        "08: LoRA, then QLoRA, 2 epochs each, bucketed, and their evaluations (section 6)":
            sum(run_seconds(m, bucketed, train_batches, per_step, evaluation[m], epochs=2)
                + every_split * evaluation[m] for m in ("lora", "qlora")),
    }, against_lora


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
    estimated, against_lora = course_estimates(args.data_path, args.batches)
    scale = args.lora_epoch_seconds / estimated[LORA_EPOCH] if args.lora_epoch_seconds else None
    print(f"\nMachine: {machine_description()}; load average {load:.1f} before the estimated parts, "
          f"{os.getloadavg()[0]:.1f} after it  ")
    print(f"Command: `python benchmarks/bench_full_mode.py {' '.join(sys.argv[1:])}`\n")
    print("| notebook part (full mode, gpt2-small) | measured now | scaled to a free machine |\n"
          "|---|---:|---:|")
    for name, value in seconds.items():
        print(f"| {name} | {value / 60:,.1f} min | |")
    for name, value in estimated.items():
        scaled = f"{scale * value / 60:,.1f} min" if scale else ""
        print(f"| {name} | {value / 60:,.1f} min | {scaled} |")
    print(f"\nSeconds per padded position against a LoRA training step's (medians of {args.batches - 1} "
          "batches):\n\n| timed | / LoRA step |\n|---|---:|")
    for name, ratio in against_lora.items():
        print(f"| {name} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
