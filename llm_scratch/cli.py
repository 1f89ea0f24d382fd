"""`python -m llm_scratch finetune | classify | pretrain | instruct | respond | export`: options -> settings.

The work is done in `llm_scratch.finetune`, `.pretrain`, `.instruct` and `.export`; an option left out keeps
its dataclass default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llm_scratch.compare import compare
from llm_scratch.export import export_run
from llm_scratch.files import explain_error
from llm_scratch.finetune import METHODS, FinetuneSettings, classify_with_run, finetune
from llm_scratch.instruct import InstructSettings, instruct, respond_with_run
from llm_scratch.optimizer import LR_SCHEDULES
from llm_scratch.precision import PRECISIONS
from llm_scratch.pretrain import PretrainSettings, pretrain

# flag -> (type, choices, or None for a switch; help: {d.NAME} the settings' default, {m.NAME} its module's)
SHARED = {
    "--epochs": (int, "default {m.EPOCHS} ({m.QUICK_EPOCHS} in quick mode)"),
    "--lr": (float, "learning rate (default: see {m.__name__})"),
    "--batch-size": (int, "default {m.BATCH_SIZE} ({m.QUICK_BATCH_SIZE} in quick mode)"),
    "--seed": (int, "default {d.seed}"),
    "--device": (str, "cpu, cuda, cuda:N or mps (default: the best available)"),
    "--precision": (PRECISIONS, "fp32 (default), or bf16 / fp16: 16-bit matrix products, float32 weights"),
    "--quick": (None, "tiny model, shipped data, no network (also LLM_SCRATCH_QUICK=1)"),
    "--overwrite": (None, "replace the run already in --out, once the new run is complete"),
}
FINETUNE = {
    "--method": (METHODS, "default {d.method}"),
    "--model-name": (str, "gpt2-small (the default), gpt2-medium, gpt2-large or gpt2-xl"),
    "--out": (Path, "run folder, written when complete (default runs/METHOD)"),
    "--rank": (int, "LoRA rank (default {d.DEFAULT_LORA.rank})"),
    "--alpha": (float, "LoRA alpha; updates scale by alpha / rank (default {d.DEFAULT_LORA.alpha:g})"),
    "--loraplus-lr-ratio": (float, "LoRA+: B's learning rate over A's, e.g. 16 (LoRA methods; default none)"),
    "--lr-schedule": (LR_SCHEDULES, "constant, or cosine: down to lr / 10 by the last step (default "
                                    "{d.LR_SCHEDULE}, {d.QUICK_LR_SCHEDULE} in quick mode)"),
    "--bucket": (None, "batch messages of similar length together: less padding, faster epochs"),
    "--data-path": (Path, "a local SMSSpamCollection file or the UCI zip (no download)"),
    "--weights-path": (Path, "a local GPT-2 model.safetensors file (no download)"),
    "--random-init": (None, "random weights instead of pretrained GPT-2"), "--compare": (None, "all methods"),
    "--eval-every": (int, "steps between validation-loss checks (default {d.eval_every})"),
    "--checkpointing": (None, "recompute each block in backward: less memory, slower (qlora's default)"),
}
INSTRUCT = {
    "--method": (InstructSettings.METHODS, "default {d.method}"),
    "--model-name": (str, "gpt2-medium (the default), gpt2-small, gpt2-large or gpt2-xl"),
    "--out": (Path, "run folder, written when complete (default runs/instruct-METHOD)"),
    "--rank": (int, "LoRA rank (default {d.DEFAULT_LORA.rank})"),
    "--alpha": (float, "LoRA alpha; updates scale by alpha / rank (default {d.DEFAULT_LORA.alpha:g})"),
    "--loraplus-lr-ratio": (float, "LoRA+: B's learning rate over A's, e.g. 16 (LoRA methods; default none)"),
    "--lr-schedule": (LR_SCHEDULES, "constant, or cosine: down to lr / 10 by the last step (default "
                                    "{d.LR_SCHEDULE}, {d.QUICK_LR_SCHEDULE} in quick mode)"),
    "--mask-prompt": (None, "the loss on the response's tokens only, not the prompt's"),
    "--max-new-tokens": (int, "the longest response to the test split (default {d.max_new_tokens})"),
    "--judge-url": (str, "an Ollama server (e.g. http://localhost:11434) that scores each response 0-100"),
    "--judge-model": (str, "the judge's model at --judge-url (default {d.judge_model})"),
    "--data-path": (Path, "a JSON file of instruction, input, output entries (default: the shipped data)"),
    "--weights-path": (Path, "a local GPT-2 model.safetensors file (no download)"),
    "--random-init": (None, "random weights instead of pretrained GPT-2"),
    "--eval-every": (int, "steps between validation-loss checks (default {d.eval_every})"),
    "--checkpointing": (None, "recompute each block in backward: less memory, slower (qlora's default)"),
}
PRETRAIN = {
    "--model-name": (str, "tiny (the default), gpt2-small, gpt2-medium, gpt2-large or gpt2-xl"),
    "--out": (Path, "run folder, written when complete (default runs/pretrain)"),
    "--stride": (int, "(default: no overlap)"),
    "--data-path": (Path, "a UTF-8 text file (default: the story that ships with the package)"),
    "--context-length": (int, "window length (default {m.CONTEXT_LENGTH}, quick {m.QUICK_CONTEXT_LENGTH})"),
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
    add_command(commands, "instruct", "fine-tune GPT-2 to follow instructions", INSTRUCT, InstructSettings())
    answer = commands.add_parser("respond", help="answer an instruction with a saved instruct run")
    answer.add_argument("--run", type=Path, required=True, help="the folder an instruct run wrote")
    answer.add_argument("--input", default="", help="the text the instruction is about, if any")
    answer.add_argument("instruction", help="what the model should do, in quotes")
    cls = commands.add_parser("classify", help="classify texts with a saved fine-tuning run",
                              usage="%(prog)s [-h] --run RUN [--] texts [texts ...]")  # -- : see texts
    cls.add_argument("--run", type=Path, required=True, help="the folder a finetune run wrote")
    cls.add_argument("texts", nargs="+", help="one or more messages; put -- before them if one starts "
                                              "with '-': classify --run DIR -- '-50%% off today'")
    export = commands.add_parser("export", help="write a run in Hugging Face's formats (transformers, PEFT)")
    export.add_argument("--run", type=Path, required=True,
                        help="the folder a finetune, instruct or pretrain run wrote")
    export.add_argument("--out", type=Path, required=True, help="the folder to write, when complete")
    export.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "compare")}
    try:
        if args.command == "classify":
            for text, (label, prob) in zip(args.texts, classify_with_run(args.run, args.texts), strict=True):
                print(f"{label:>4} ({prob:.1%})  {text}")
            sys.stdout.flush()  # here, so that a closed pipe (`| head -1`) is caught below
        elif args.command == "pretrain":
            pretrain(PretrainSettings(**options))
        elif args.command == "instruct":
            instruct(InstructSettings.from_options(**options))
        elif args.command == "respond":
            print(respond_with_run(args.run, args.instruction, args.input))
        elif args.command == "export":
            export_run(args.run, args.out, args.overwrite)
        elif getattr(args, "compare", False):  # the command line goes under the comparison table
            command = " ".join(["python -m llm_scratch", *(sys.argv[1:] if argv is None else argv)])
            compare(FinetuneSettings.from_options(**options), command=command)
        else:
            finetune(FinetuneSettings.from_options(**options))
    except BrokenPipeError:  # the reader went away (`| head -1`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except KeyboardInterrupt:  # one line, no traceback; exit code 130 as a shell gives it
        print("error: interrupted (Ctrl-C): the run in progress changed no run folder and left no file "
              "half-written", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as error:  # OSError: a full disk, ...
        print(f"error: {explain_error(error)}", file=sys.stderr)  # one line, no traceback
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
