"""`python -m llm_scratch finetune | classify | pretrain`: turn options into `FinetuneSettings` or
`PretrainSettings` and print; the work is done in `llm_scratch.finetune` and `llm_scratch.pretrain`. An option
left out keeps the default written in its settings dataclass (or `CLASSIFIER_LORA` for LoRA's).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from llm_scratch.classifier import classify
from llm_scratch.finetune import CLASSIFIER_LORA, METHODS, FinetuneSettings, compare, finetune, load_run
from llm_scratch.pretrain import PretrainSettings, pretrain

LORA_OPTIONS = ("rank", "alpha")  # options that go into the run's LoRAConfig, not FinetuneSettings itself
# flag -> (type, choices or None for a switch; help: {d.NAME} the settings' default, {m.NAME} its module's)
SHARED = {
    "--model-name": (str, "gpt2-small, gpt2-medium, gpt2-large, gpt2-xl or tiny (default {d.model_name})"),
    "--epochs": (int, "default {m.EPOCHS} ({m.QUICK_EPOCHS} in quick mode)"),
    "--lr": (float, "learning rate (default: see {m.__name__})"),
    "--batch-size": (int, "default {d.batch_size}"), "--seed": (int, "default {d.seed}"),
    "--device": (str, "cpu, cuda or mps (default: the best available)"),
    "--quick": (None, "tiny model, shipped data, no network (also LLM_SCRATCH_QUICK=1)"),
}
FINETUNE = {
    "--method": (METHODS, "default {d.method}"),
    "--out": (Path, "run folder (default runs/METHOD)"),
    "--rank": (int, "LoRA rank (default {m.CLASSIFIER_LORA.rank})"),
    "--alpha": (float, "LoRA alpha; updates scale by alpha / rank (default {m.CLASSIFIER_LORA.alpha:g})"),
    "--bucket": (None, "batch messages of similar length together: less padding, faster epochs"),
    "--data-path": (Path, "a local SMSSpamCollection file or the UCI zip (no download)"),
    "--weights-path": (Path, "a local GPT-2 model.safetensors file (no download)"),
    "--random-init": (None, "start from random weights instead of pretrained GPT-2 (tests, benchmarks)"),
    "--compare": (None, "run full, last-block and lora one after the other and compare them"),
    "--eval-every": (int, "steps between validation-loss checks (default {d.eval_every})"),
}
PRETRAIN = {
    "--out": (Path, "run folder (default runs/pretrain)"),
    "--data-path": (Path, "a UTF-8 text file (default: the story that ships with the package)"),
    "--context-length": (int, "window length (default {m.CONTEXT_LENGTH}, quick {m.QUICK_CONTEXT_LENGTH})"),
    "--stride": (int, "tokens between window starts (default: the context length, no overlap)"),
    "--eval-every": (int, "steps between loss checks (default {m.EVAL_EVERY}, quick {m.QUICK_EVAL_EVERY})"),
    "--sample-prompt": (str, "the text continued after every epoch (default {d.sample_prompt!r})"),
}


def add_command(commands, name: str, text: str, options: dict, default) -> None:
    """A subcommand with SHARED and `options` and --no-progress; each help filled in from `default`."""
    # SUPPRESS: an option the user leaves out is absent from the result, so the dataclass default applies.
    parser = commands.add_parser(name, help=text, argument_default=argparse.SUPPRESS)
    for flag, (kind, about) in {**SHARED, **options}.items():
        how = {"choices" if isinstance(kind, tuple) else "type": kind} if kind else {"action": "store_true"}
        parser.add_argument(flag, help=about.format(d=default, m=sys.modules[default.__module__]), **how)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm_scratch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_command(commands, "finetune", "fine-tune GPT-2 as a spam classifier", FINETUNE, FinetuneSettings())
    add_command(commands, "pretrain", "pretrain a GPT from scratch on a text", PRETRAIN, PretrainSettings())
    cls = commands.add_parser("classify", help="classify texts with a saved fine-tuning run")
    cls.add_argument("--run", type=Path, required=True, help="the folder a finetune run wrote")
    cls.add_argument("texts", nargs="+", help="one or more messages")
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
            model, run = load_run(args.run)
            for text in args.texts:
                label, prob = classify(text, model, labels=tuple(run["labels"]), max_length=run["max_length"])
                print(f"{label:>4} ({prob:.1%})  {text}")
        elif args.command == "pretrain":
            pretrain(PretrainSettings(**options))
        elif getattr(args, "compare", False):
            given = sys.argv[1:] if argv is None else argv
            compare(settings_from(options), command=" ".join(["python -m llm_scratch", *given]))
        else:
            finetune(settings_from(options))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
