"""Instruction tuning's training step, ours against Hugging Face `GPT2LMHeadModel` + PEFT; an epoch's time.

    python benchmarks/bench_instruct.py               # gpt2-medium shape, LoRA rank 16, batches of 8
    python benchmarks/bench_instruct.py --smoke       # tiny shape, 2 rounds (what CI runs)

Both models have GPT-2's shape with random weights (a step costs the same whatever their values) and LoRA of
the same rank and alpha on the same weight matrices (ours: query, key, value, out_proj, fc1, fc2; theirs: the
fused c_attn, both c_proj and c_fc). Each round takes the next batch of the real training split, as
`instruct` batches it (its length distribution, padded to the batch's longest; prompt masking as
`--mask-prompt` says), and the models step on it in turn, each computing the same masked next-token loss on
its logits. An epoch's time is estimated as the mean step time over the rounds times the steps of an epoch
(the rounds sample the real lengths); it is labelled so.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import machine_description, median_ratio, times_in_turn  # benchmarks/ is on the path

from llm_scratch.config import PRESETS
from llm_scratch.data.instruction import IGNORE_INDEX, instruction_dataloaders, load_instruction_splits
from llm_scratch.instruct import INSTRUCT_LORA
from llm_scratch.methods import prepare_for_method
from llm_scratch.model import GPTModel
from llm_scratch.precision import autocast, device_supports

MODELS = ("ours", "hf+peft")


def build(name: str, preset: str, rank: int, alpha: float, seed: int = 0) -> torch.nn.Module:
    """Our GPT or Hugging Face's GPT2LMHeadModel, of the preset's shape, with LoRA; training mode."""
    cfg = PRESETS[preset]
    torch.manual_seed(seed)
    if name == "ours":
        model = GPTModel(cfg)
        prepare_for_method(model, "lora", dataclasses.replace(INSTRUCT_LORA, rank=rank, alpha=alpha))
        return model.train()
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)  # no dropout, as ours
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, fan_in_fan_out=True,
                      target_modules=["c_attn", "c_proj", "c_fc"])
    return get_peft_model(GPT2LMHeadModel(hf_cfg), lora).train()


def train_step(model: torch.nn.Module, precision: str) -> Callable[[tuple], float]:
    """One fused-AdamW step on a batch (inputs, targets) with the masked next-token loss; returns the loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    ours = isinstance(model, GPTModel)

    def step(batch: tuple) -> float:
        inputs, targets = batch  # (batch, n_tokens) each
        with autocast(precision, "cpu"):
            logits = model(inputs) if ours else model(input_ids=inputs).logits  # (batch, n_tokens, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-medium", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (each on the next batch)")
    parser.add_argument("--mask-prompt", action="store_true", help="the loss on the responses' tokens only")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 rounds (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.rounds = "tiny", 2
    command = "python benchmarks/bench_instruct.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    loader = instruction_dataloaders(load_instruction_splits(), batch_size=args.batch_size,
                                     mask_prompt=args.mask_prompt,
                                     context_length=PRESETS[args.preset].context_length).train
    batches = iter(loader)
    precisions = ["fp32"] + (["bf16"] if device_supports("bf16", torch.device("cpu")) else [])
    steps = {f"{name} {precision}": train_step(build(name, args.preset, args.rank, args.alpha), precision)
             for name in MODELS for precision in precisions}
    round_batches: list[tuple] = []

    def next_batch() -> None:  # the first callable of each round: the round's batch
        round_batches.append(tuple(next(batches)))

    calls = {"batch": next_batch, **{name: (lambda s=s: s(round_batches[-1])) for name, s in steps.items()}}
    seconds, losses = times_in_turn(calls, warmup=1, repeats=args.rounds)
    del seconds["batch"], losses["batch"]
    results = {"seconds": seconds, "losses": losses, "steps_per_epoch": len(loader),
               "epoch_s": {name: statistics.mean(s) * len(loader) for name, s in seconds.items()},
               "ratios": {p: median_ratio(seconds[f"ours {p}"], seconds[f"hf+peft {p}"])
                          for p in precisions}}
    print(report(results, args, command, precisions))
    return results


def report(r: dict, args: argparse.Namespace, command: str, precisions: list[str]) -> str:
    lines = [f"Machine: {machine_description()}", f"Command: `{command.strip()}`", "",
             f"{args.preset} shape, LoRA rank {args.rank} alpha {args.alpha:g}, batches of {args.batch_size} "
             f"from the real training split ({r['steps_per_epoch']} steps an epoch), prompt masking "
             f"{'on' if args.mask_prompt else 'off'}; {args.rounds} rounds after a warm-up, the models in "
             "turn.",
             "", "| model | step (median) | epoch, estimated from the timed steps |", "|---|---:|---:|"]
    for name, seconds in r["seconds"].items():
        lines.append(f"| {name} | {statistics.median(seconds):.2f} s | {r['epoch_s'][name] / 60:.1f} min |")
    lines += ["", "| ratio | median of per-round ratios |", "|---|---:|"]
    lines += [f"| ours / HF + PEFT, {p} | {r['ratios'][p]:.2f} |" for p in precisions]
    if "bf16" in precisions:
        bf16 = median_ratio(r["seconds"]["ours bf16"], r["seconds"]["ours fp32"])
        lines.append(f"| ours bf16 / ours fp32 | {bf16:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
