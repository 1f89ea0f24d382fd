"""Training speed and memory of our GPT-2 spam classifier, side by side with Hugging Face (+ PEFT).

    python benchmarks/bench_finetune.py            # the table in benchmarks/RESULTS.md (about 20 minutes)
    python benchmarks/bench_finetune.py --smoke    # tiny shapes and a few steps (what CI runs)

Random weights throughout: the speed of a step does not depend on their values. Step times are medians
over several steps after a warm-up, with the compared models stepping in turn (A, B, A, B, ...) so that a
busy moment of the machine slows both alike. Peak memory is measured in a fresh process per model.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (  # benchmarks/ is on the path
    machine_description,
    medians,
    process_memory_mb,
    sms_spam_file,
    times_in_turn,
)

from llm_scratch.classifier import add_classification_head, classification_loss
from llm_scratch.config import GPTConfig
from llm_scratch.data import SpamBatch, load_spam_splits, spam_dataloaders
from llm_scratch.methods import CLASSIFIER_LORA, prepare_for_method
from llm_scratch.model import GPTModel
from llm_scratch.precision import autocast

MODELS = ("ours full", "hf full", "ours lora", "hf+peft lora")
DORA_MODELS = ("ours dora", "hf+peft dora")  # measured by bench_dora.py, built here


def build(name: str, cfg: GPTConfig, rank: int, alpha: float, seed: int = 123) -> torch.nn.Module:
    """One of MODELS or DORA_MODELS: a 2-class classifier of shape `cfg`, random weights, set up for its
    method."""
    torch.manual_seed(seed)
    if name.startswith("ours"):
        model = add_classification_head(GPTModel(cfg), num_classes=2, seed=seed)
        lora_config = dataclasses.replace(CLASSIFIER_LORA, rank=rank, alpha=alpha)
        prepare_for_method(model, name.split()[1], lora_config)
        return model.train()
    from transformers import GPT2Config, GPT2ForSequenceClassification

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, num_labels=2, pad_token_id=50256,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout, as ours
    model = GPT2ForSequenceClassification(hf_cfg)
    if name.startswith("hf+peft"):  # the same weight matrices as ours: q/k/v (fused in c_attn), c_proj, c_fc
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, fan_in_fan_out=True,
                          target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["score"],
                          use_dora=name.endswith("dora"))
        model = get_peft_model(model, lora)
    return model.train()


def train_step(model: torch.nn.Module, param_groups: list[dict] | None = None, precision: str = "fp32",
               fused: bool = False) -> Callable[[SpamBatch], float]:
    """One AdamW step (forward, loss, backward, update) of `model` on a batch; returns the loss.

    `param_groups` (e.g. LoRA+'s) replaces the one group of every trainable parameter; `precision` "bf16"
    runs the forward pass under autocast, as `finetune --precision bf16` does; `fused` AdamW is what
    `training.train` uses (the tables measured before it existed use the plain one)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups if param_groups is not None else trainable, lr=1e-5,
                                  fused=fused)
    ours = hasattr(model, "blocks")

    def step(batch: SpamBatch) -> float:
        with autocast(precision, "cpu"):
            if ours:
                loss = classification_loss(model, batch)
            else:  # Hugging Face reads the logits at the last token that is not padding (id 50256)
                logits = model(input_ids=batch.input_ids).logits  # (batch, 2)
                loss = F.cross_entropy(logits, batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def random_batch(batch_size: int, n_tokens: int, vocab_size: int) -> SpamBatch:
    ids = torch.randint(0, vocab_size - 1, (batch_size, n_tokens))  # no padding token: every token is real
    return SpamBatch(ids, torch.full((batch_size,), n_tokens), torch.randint(0, 2, (batch_size,)))


def matmul_gflops(n: int, repeats: int) -> float:
    """Throughput of a plain fp32 (n x n) @ (n x n) matmul on this machine, in GFLOP/s (median)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = medians(times_in_turn({"mm": lambda: a @ b}, warmup=2, repeats=repeats)[0])["mm"]
    return 2 * n**3 / seconds / 1e9


def training_flops(cfg: GPTConfig, batch_size: int, n_tokens: int) -> float:
    """Matmul FLOPs of one full training step: forward + backward (twice the forward), all weights."""
    tokens = batch_size * n_tokens
    linear = 2 * tokens * cfg.n_layers * 12 * cfg.emb_dim**2  # q, k, v, out_proj (4 d^2) + fc1, fc2 (8 d^2)
    attention = 2 * 2 * batch_size * cfg.n_layers * n_tokens**2 * cfg.emb_dim  # q k^T and weights @ v
    head = 2 * tokens * cfg.emb_dim * 2
    return 3 * (linear + attention + head)


def peak_memory_mb(name: str, args: argparse.Namespace) -> float:
    """Peak resident memory (VmHWM) of a fresh process that builds `name` and takes a few training steps."""
    command = [sys.executable, __file__, "--memory-of", name, "--preset", args.preset, "--batch-size",
               str(args.batch_size), "--tokens", str(args.tokens), "--rank", str(args.rank), "--alpha",
               str(args.alpha)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def _measure_own_memory(args: argparse.Namespace) -> None:
    cfg = GPTConfig.from_preset(args.preset)
    step = train_step(build(args.memory_of, cfg, args.rank, args.alpha))
    batch = random_batch(args.batch_size, args.tokens, cfg.vocab_size)
    for _ in range(3):  # the optimizer's state exists from the first step on
        step(batch)
    print(json.dumps({"peak_mb": process_memory_mb("VmHWM")}))


def epoch_times(args: argparse.Namespace, cfg: GPTConfig) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds and padded tokens of one LoRA training epoch on the SMS training split, for three batchings.

    The three loaders are stepped in turn, batch by batch, so that the machine's load affects them alike.
    """
    if args.smoke:
        splits = load_spam_splits(quick=True)
    else:
        if args.data is None or not Path(args.data).exists():
            raise SystemExit(f"the SMS Spam Collection is needed for the epoch timing: pass --data-path PATH "
                             f"(the default, {sms_spam_file()}, is absent)")
        splits = load_spam_splits(data_path=args.data)
    common = {"batch_size": args.batch_size, "context_length": cfg.context_length}
    fixed = f"fixed {args.fixed_pad}-token padding"
    loaders = {
        fixed: spam_dataloaders(splits, pad_to=args.fixed_pad, **common).train,
        "dynamic padding": spam_dataloaders(splits, **common).train,
        "length-bucketed batches": spam_dataloaders(splits, bucket=True, **common).train,
    }
    steps = {name: train_step(build("ours lora", cfg, args.rank, args.alpha)) for name in loaders}
    seconds = dict.fromkeys(loaders, 0.0)
    tokens = dict.fromkeys(loaders, 0)
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    for name in itertools.cycle(list(loaders)):
        if not iterators:
            break
        if name not in iterators:
            continue
        batch = next(iterators[name], None)
        if batch is None:
            del iterators[name]
            continue
        start = time.perf_counter()
        steps[name](batch)
        seconds[name] += time.perf_counter() - start
        tokens[name] += batch.input_ids.numel()
    return seconds, tokens


def add_step_options(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The options of a training-step timing (shape, batch, LoRA, rounds, --smoke), shared by the scripts."""
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=120, help="tokens per message in the step timing")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps (CI)")


def parse_step_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                    script: str) -> tuple[argparse.Namespace, str]:
    """The options of a step timing (`--smoke`: tiny shapes, 2 rounds) and the command line that gave them."""
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.tokens, args.warmup, args.repeats = "tiny", 16, 1, 2
    return args, f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(parser, repeats=7)
    parser.add_argument("--fixed-pad", type=int, default=120)
    parser.add_argument("--data-path", dest="data", default=str(sms_spam_file()),
                        help="the SMSSpamCollection file for the epoch")
    parser.add_argument("--memory-of", choices=MODELS + DORA_MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        _measure_own_memory(args)
        return {}
    if args.smoke:
        args.preset, args.tokens, args.warmup, args.repeats, args.fixed_pad = "tiny", 16, 1, 2, 256
    command = "python benchmarks/bench_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg = GPTConfig.from_preset(args.preset)
    batch = random_batch(args.batch_size, args.tokens, cfg.vocab_size)

    models = {name: build(name, cfg, args.rank, args.alpha) for name in MODELS}
    trainable = {name: sum(p.numel() for p in model.parameters() if p.requires_grad)
                 for name, model in models.items()}
    steps = {name: train_step(model) for name, model in models.items()}
    calls = {name: (lambda step=step: step(batch)) for name, step in steps.items()}
    step_s = medians(times_in_turn(calls, args.warmup, args.repeats)[0])
    del models, steps
    memory = {name: peak_memory_mb(name, args) for name in (MODELS[::2] if args.smoke else MODELS)}
    matmul = matmul_gflops(256 if args.smoke else 2048, repeats=3 if args.smoke else 10)
    achieved = training_flops(cfg, args.batch_size, args.tokens) / step_s["ours full"] / 1e9
    epoch_s, epoch_tokens = epoch_times(args, cfg)

    results = {"step_s": step_s, "peak_mb": memory, "matmul_gflops": matmul, "step_gflops": achieved,
               "epoch_s": epoch_s, "epoch_tokens": epoch_tokens, "trainable": trainable}
    print(report(results, args, command))
    return results


def step_table(names: tuple[str, ...], step_s: dict, peak_mb: dict, args: argparse.Namespace, command: str,
               setting: str) -> list[str]:
    """Markdown lines: machine, command, the table of step times and peak memory, a ratio table's header."""
    memory = {name: f"{peak_mb[name]:,.0f} MB" if name in peak_mb else "-" for name in names}
    return [
        f"Machine: {machine_description()}",
        f"Command: `{command.strip()}`",
        "",
        f"Training step of a {args.preset}-shaped classifier, batch {args.batch_size} x {args.tokens} tokens "
        f"(median of {args.repeats} after {args.warmup} warm-up; {setting}):",
        "",
        "| model | step time | peak memory (process) |",
        "|---|---:|---:|",
        *(f"| {name} | {step_s[name]:.3f} s | {memory[name]} |" for name in names),
        "",
        "| ratio | value |",
        "|---|---:|",
    ]


def report(r: dict, args: argparse.Namespace, command: str) -> str:
    s, m = r["step_s"], r["peak_mb"]
    lines = [
        *step_table(MODELS, s, m, args, command, f"LoRA rank {args.rank}, alpha {args.alpha:g}"),
        f"| ours full / HF full (step time) | {s['ours full'] / s['hf full']:.2f} |",
        f"| ours LoRA / HF + PEFT LoRA (step time) | {s['ours lora'] / s['hf+peft lora']:.2f} |",
        f"| ours LoRA / ours full (step time) | {s['ours lora'] / s['ours full']:.2f} |",
        f"| ours LoRA / ours full (peak memory) | {m['ours lora'] / m['ours full']:.2f} |",
        f"| our full step: {r['step_gflops']:.1f} GFLOP/s / plain fp32 matmul "
        f"{r['matmul_gflops']:.1f} GFLOP/s | {r['step_gflops'] / r['matmul_gflops']:.2f} |",
        "",
        "One LoRA training epoch on the SMS training split (batch "
        f"{args.batch_size}; loaders stepped in turn):",
        "",
        "| batching | epoch time | tokens computed | speed-up |",
        "|---|---:|---:|---:|",
    ]
    fixed = next(iter(r["epoch_s"].values()))  # the fixed padding comes first
    lines += [f"| {name} | {sec:.1f} s | {r['epoch_tokens'][name]:,} | {fixed / sec:.2f}x |"
              for name, sec in r["epoch_s"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
