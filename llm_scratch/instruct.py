"""Instruction fine-tuning end to end: `instruct` teaches GPT-2 to answer instructions (LoRA by default), then
answers the test split and scores the answers offline; `load_instruct_run` and `respond_with_run` use a run.

The run folder goes through the run layer (`llm_scratch.run_record`): staged, locked, recorded, refused when
it would mix runs. It holds the trained tensors, `responses.json` (instruction, input, reference, response),
`metrics.json` (the test loss and perplexity on response tokens, ROUGE-L F1, exact matches, the share of
responses that ended with end-of-text, optionally a judge's scores) and `loss.png`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import matplotlib.pyplot as plt
import torch

from llm_scratch.classifier import wilson_interval
from llm_scratch.config import pick_device
from llm_scratch.data.instruction import instruction_dataloaders, load_instruction_splits
from llm_scratch.judge import DEFAULT_MODEL as DEFAULT_JUDGE_MODEL
from llm_scratch.judge import check_judge, judge_responses
from llm_scratch.language_model import evaluate_language_model, train_language_model
from llm_scratch.lora import LoRAConfig, parameter_summary
from llm_scratch.loraplus import loraplus_param_groups
from llm_scratch.methods import prepare_for_method
from llm_scratch.model import GPTModel
from llm_scratch.plots import plot_losses, save_figure
from llm_scratch.precision import autocast, check_precision
from llm_scratch.responses import DEFAULT_MAX_NEW_TOKENS, generate_responses, respond
from llm_scratch.run_folder import fingerprint
from llm_scratch.run_record import (
    LOSS_FIGURE,
    METRICS_FILE,
    RESPONSES_FILE,
    RunRecord,
    load_base,
    read_record,
    write_json,
    write_record,
    writing_run_folder,
)
from llm_scratch.run_settings import RunSettings, base_model, load_trained, save_trained
from llm_scratch.scores import summarize_scores

COMMAND = "instruct"
METHODS = ("full", "lora", "dora", "qlora")
# The reference course's recipe for full fine-tuning: GPT-2 medium, 2 epochs, batches of 8, AdamW at 5e-5.
# LoRA trains new matrices from B = 0 and takes a 10 times larger step, as for classification. Quick mode
# trains the tiny random model from scratch, which needs larger steps still, and many of them: one epoch of
# full fine-tuning in batches of 2 at 3e-3 takes its test loss on response tokens to 0.48 of its start, in 40%
# of the time 2 epochs in batches of 8 at 5e-3 took to reach 0.46 (batches of 2 at 2e-3 and 5e-3: 0.49).
DEFAULT_MODEL_NAME, EPOCHS, QUICK_EPOCHS = "gpt2-medium", 2, 1
BATCH_SIZE, QUICK_BATCH_SIZE = 8, 2
LEARNING_RATES = {"full": 5e-5, "lora": 5e-4, "dora": 5e-4, "qlora": 5e-4}
QUICK_LEARNING_RATES = {"full": 3e-3, "lora": 3e-3, "dora": 3e-3, "qlora": 3e-3}
# LoRA beside every Linear of the blocks; the output head, tied to the token embedding, stays frozen.
INSTRUCT_LORA = LoRAConfig(rank=16, alpha=16.0)


@dataclass(frozen=True)
class InstructSettings(RunSettings):
    """Everything one instruction-tuning run depends on (the fields of `RunSettings` and the ones below); the
    CLI's options map one to one onto them. `data_path`: a JSON file in the layout of the shipped data."""

    COMMAND: ClassVar[str] = COMMAND
    METHODS: ClassVar[tuple[str, ...]] = METHODS
    DEFAULT_MODEL_NAME: ClassVar[str] = DEFAULT_MODEL_NAME
    EPOCHS: ClassVar[int] = EPOCHS
    QUICK_EPOCHS: ClassVar[int] = QUICK_EPOCHS
    BATCH_SIZE: ClassVar[int] = BATCH_SIZE
    QUICK_BATCH_SIZE: ClassVar[int] = QUICK_BATCH_SIZE
    LEARNING_RATES: ClassVar[dict[str, float]] = LEARNING_RATES
    QUICK_LEARNING_RATES: ClassVar[dict[str, float]] = QUICK_LEARNING_RATES
    DEFAULT_LORA: ClassVar[LoRAConfig] = INSTRUCT_LORA
    OUT_PREFIX: ClassVar[str] = "instruct-"  # runs/instruct-lora: never a classification run's folder

    mask_prompt: bool = False  # the loss on the response's tokens only (the prompt's targets are -100)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the longest response generated for the test split
    judge_url: str | None = None  # an Ollama server that scores every response 0-100 (optional)
    judge_model: str = DEFAULT_JUDGE_MODEL

    def check_contradictions(self) -> None:
        super().check_contradictions()
        if self.lora_config is not None and self.lora_config.modules_to_save:
            raise ValueError("instruction tuning trains no new head: the output head is GPT-2's, tied to the "
                             "token embedding; leave modules_to_save empty")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or \
                self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if self.judge_url is None and self.judge_model != DEFAULT_JUDGE_MODEL:
            raise ValueError("--judge-model names the judge at --judge-url; give the url too")


def instruct(settings: InstructSettings) -> dict:
    """Fine-tune a GPT on instructions, answer the test split, score the answers; write the run folder.

    Returns the metrics (also in metrics.json), e.g. `instruct(InstructSettings(quick=True))`.
    """
    settings = settings.resolved()
    check_precision(settings.precision, torch.device(settings.device))  # before anything is written
    if settings.judge_url is not None:
        check_judge(settings.judge_model, settings.judge_url)  # a missing judge is told now, not after hours
    with writing_run_folder(settings.out, COMMAND, settings.overwrite) as folder:  # replaces `out` at the end
        metrics = _train_into(folder, settings)
    scores = metrics["test_scores"]
    print(f"{settings.method}: test loss on response tokens {metrics['test_response_loss']:.3f} (perplexity "
          f"{metrics['test_response_perplexity']:.1f}, from {metrics['test_response_loss_before']:.3f} "
          f"before training); ROUGE-L F1 {scores['rouge_l_f1']:.3f}, exact matches "
          f"{scores['exact_matches']} of {scores['n']}, ended with end-of-text {scores['ended_with_eos']}; "
          f"wrote {settings.out}/{{{', '.join(sorted(p.name for p in settings.out.iterdir()))}}}")
    return metrics


def _train_into(folder: Path, settings: InstructSettings) -> dict:
    """The run itself: train, answer, score, then write every file of the run into `folder` (new, empty)."""
    device = torch.device(settings.device)
    splits = load_instruction_splits(settings.data_path, quick=settings.quick)
    base = base_model(settings, folder)
    model = load_base(base, folder, device, command=COMMAND, verify=False,  # hashed just now: once is enough
                      lora_config=settings.lora_config)
    prepare_for_method(model, settings.method, settings.lora_config, seed=settings.seed)
    model.checkpointing = settings.checkpointing
    groups = None if settings.loraplus_lr_ratio is None else loraplus_param_groups(
        model, settings.lr, settings.loraplus_lr_ratio)
    summary = parameter_summary(model, verbose=False)
    print(f"{settings.method}: {summary}  |  device {device}  |  {base.note}")
    context = model.cfg.context_length
    loaders = instruction_dataloaders(splits, batch_size=settings.batch_size,
                                      mask_prompt=settings.mask_prompt, context_length=context,
                                      seed=settings.seed)
    # The test loss is on the response's tokens, whatever the training masked: the same number for every run.
    test = instruction_dataloaders(splits, batch_size=settings.batch_size, mask_prompt=True,
                                   context_length=context).test
    with autocast(settings.precision, device):
        before = evaluate_language_model(model, test)
    history = train_language_model(model, loaders.train, loaders.validation, epochs=settings.epochs,
                                   lr=settings.lr, lr_schedule=settings.lr_schedule,
                                   eval_every=settings.eval_every, seed=settings.seed,
                                   device=device, progress=settings.progress, param_groups=groups,
                                   precision=settings.precision)
    with autocast(settings.precision, device):
        after = evaluate_language_model(model, test)
    saved = save_trained(model, settings, folder)
    responses = generate_responses(model, splits.test, settings.max_new_tokens, progress=settings.progress)
    write_json(folder / RESPONSES_FILE, {"responses": [response._asdict() for response in responses]})
    metrics = {"command": COMMAND, "method": settings.method, "model_name": settings.model_name,
               "quick": settings.quick, "data": _data_name(settings), "settings": settings.recorded(),
               "test_examples": len(splits.test), "test_response_loss_before": before["loss"],
               "test_response_loss": after["loss"], "test_response_perplexity": after["perplexity"],
               "test_scores": _scores(responses, settings), "trainable_parameters": summary.trainable,
               "base_parameters": summary.base, "train_time_s": history.wall_time_s,
               "peak_memory_mb": history.peak_memory_mb, "peak_memory_kind": history.peak_memory_kind,
               "saved_file": saved.name, "history": history.to_dict()}
    write_json(folder / METRICS_FILE, metrics)
    record = RunRecord(command=COMMAND, method=settings.method, model_name=settings.model_name,
                       quick=settings.quick, data=metrics["data"], base=base, settings=metrics["settings"],
                       files={saved.name: fingerprint(saved)}, lora_config=settings.lora_config)
    save_figure(plot_losses(history, f"{settings.method} loss: {record.setting}"), LOSS_FIGURE, folder)
    plt.close("all")
    write_record(folder, record)  # last: a folder with its record is a complete run
    return metrics


def _data_name(settings: InstructSettings) -> str:
    if settings.data_path is not None:
        return str(settings.data_path)
    return "instruction data" + (" (quick subset)" if settings.quick else "")


def _scores(responses, settings: InstructSettings) -> dict:
    """ROUGE-L F1, exact matches and responses ended with end-of-text (with their 95% intervals), and the
    judge's mean score when a judge is given."""
    summary = summarize_scores([r.reference for r in responses], [r.response for r in responses],
                               [r.ended_with_eos for r in responses])
    scores = {**summary._asdict(),
              "exact_match_interval": list(wilson_interval(summary.exact_matches, summary.n)),
              "ended_with_eos_interval": list(wilson_interval(summary.ended_with_eos, summary.n))}
    if settings.judge_url is not None:
        judged = judge_responses(responses, settings.judge_model, settings.judge_url, settings.seed,
                                 progress=settings.progress)
        scores.update({"judge_model": settings.judge_model, "judge_scores": judged,
                       "judge_mean": sum(judged) / len(judged)})
    return scores


def load_instruct_run(run_dir: str | Path, device: str | None = None) -> tuple[GPTModel, RunRecord]:
    """The instruction-tuned model saved in `run_dir` by `instruct`, in eval mode, and its record; every file
    checked against the record (see `llm_scratch.finetune.load_run`)."""
    run_dir = Path(run_dir)
    record = read_record(run_dir, COMMAND)
    model = load_base(record.base, run_dir, pick_device(device), command=COMMAND,
                      lora_config=record.lora_config)
    load_trained(model, record, run_dir)
    return model.eval(), record


def respond_with_run(run_dir: str | Path, instruction: str, input_text: str = "",
                     device: str | None = None) -> str:
    """The response of the run saved in `run_dir` to one instruction (and its input)."""
    model, record = load_instruct_run(run_dir, device)
    return respond(model, instruction, input_text, max_new_tokens=record.settings["max_new_tokens"])


def read_responses(run_dir: str | Path) -> list[dict]:
    """The test split's responses a run wrote: instruction, input, reference, response, ended_with_eos."""
    return json.loads((Path(run_dir) / RESPONSES_FILE).read_text(encoding="utf-8"))["responses"]
