"""`python -m llm_scratch`: fine-tune GPT-2 as an SMS spam classifier, compare methods, classify texts.

This module only turns options into `FinetuneSettings` and prints; the work is done in `llm_scratch.finetune`.
An option left out keeps the default written in `FinetuneSettings` (or `CLASSIFIER_LORA` for LoRA's).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from llm_scratch.finetune import (
    CLASSIFIER_LORA,
    EPOCHS,
    METHODS,
    QUICK_EPOCHS,
    FinetuneSettings,
    classify_with_run,
    compare,
    finetune,
)
from llm_scratch.run_folder import explain_error

LORA_OPTIONS = ("rank", "alpha")  # options that go into the run's LoRAConfig, not FinetuneSettings itself


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm_scratch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    default = FinetuneSettings()
    # SUPPRESS: an option the user leaves out is absent from the result, so the dataclass default applies.
    tune = commands.add_parser("finetune", help="fine-tune GPT-2 as a spam classifier and save the run",
                               argument_default=argparse.SUPPRESS)
    tune.add_argument("--method", choices=METHODS, help=f"default {default.method}")
    tune.add_argument("--model-name", help="gpt2-small (the default), gpt2-medium, gpt2-large or gpt2-xl")
    tune.add_argument("--epochs", type=int, help=f"default {EPOCHS} ({QUICK_EPOCHS} in quick mode)")
    tune.add_argument("--out", type=Path, help="run folder, written when complete (default runs/METHOD)")
    tune.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    tune.add_argument("--rank", type=int, help=f"LoRA rank (default {CLASSIFIER_LORA.rank})")
    tune.add_argument("--alpha", type=float, help=f"LoRA alpha; the update is scaled by alpha / rank "
                                                  f"(default {CLASSIFIER_LORA.alpha:g})")
    tune.add_argument("--lr", type=float, help="learning rate (default: per method, see finetune.py)")
    tune.add_argument("--loraplus-ratio", dest="loraplus_lr_ratio", type=float,
                      help="LoRA+: B's learning rate over A's, e.g. 16 (lora, dora; default: plain LoRA)")
    tune.add_argument("--batch-size", type=int, help=f"default {default.batch_size}")
    tune.add_argument("--bucket", action="store_true",
                      help="batch messages of similar length together: less padding, faster epochs")
    tune.add_argument("--seed", type=int, help=f"default {default.seed}")
    tune.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    tune.add_argument("--quick", action="store_true",
                      help="tiny model, shipped data, no network (also LLM_SCRATCH_QUICK=1)")
    tune.add_argument("--data-path", type=Path, help="a SMSSpamCollection file or UCI zip (no download)")
    tune.add_argument("--weights-path", type=Path, help="a local GPT-2 model.safetensors file (no download)")
    tune.add_argument("--random-init", action="store_true", help="start from random weights, not GPT-2's")
    tune.add_argument("--compare", action="store_true", help="run full, last-block and lora; compare them")
    tune.add_argument("--eval-every", type=int, help=f"steps between loss checks ({default.eval_every})")
    tune.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    cls = commands.add_parser("classify", help="classify texts with a saved fine-tuning run",
                              usage="%(prog)s [-h] --run RUN [--] texts [texts ...]")  # -- : see texts
    cls.add_argument("--run", type=Path, required=True, help="the folder a finetune run wrote")
    cls.add_argument("texts", nargs="+", help="one or more messages; put -- before them if one starts "
                                              "with '-': classify --run DIR -- '-50%% off today'")
    return parser


def settings_from(options: dict) -> FinetuneSettings:
    """The `FinetuneSettings` of the options given on the command line; the others keep their defaults."""
    lora = {name: options.pop(name) for name in LORA_OPTIONS if name in options}
    return FinetuneSettings(**options, lora_config=dataclasses.replace(CLASSIFIER_LORA, **lora))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "compare")}
    try:
        if args.command == "classify":
            for text, (label, prob) in zip(args.texts, classify_with_run(args.run, args.texts), strict=True):
                print(f"{label:>4} ({prob:.1%})  {text}")
            sys.stdout.flush()  # here, so that a closed pipe (`| head -1`) is caught below
        elif getattr(args, "compare", False):
            given = sys.argv[1:] if argv is None else argv
            compare(settings_from(options), command=" ".join(["python -m llm_scratch", *given]))
        else:
            finetune(settings_from(options))
    except BrokenPipeError:  # the reader went away (`| head -1`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except (ValueError, RuntimeError, OSError, KeyboardInterrupt) as error:  # OSError: a full disk, ...
        print(f"error: {explain_error(error)}", file=sys.stderr)  # one line, no traceback
        return 130 if isinstance(error, KeyboardInterrupt) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
