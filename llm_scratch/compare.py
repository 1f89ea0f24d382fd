"""Several fine-tuning methods on the same data and seed, side by side: a table (comparison.md) and a figure
(comparison.png) of their parameters, accuracies with their intervals, times and memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib.pyplot as plt

from llm_scratch.classifier import format_accuracy
from llm_scratch.files import atomic_path
from llm_scratch.finetune import FinetuneSettings, finetune
from llm_scratch.methods import COMPARED_METHODS, LORA_METHODS
from llm_scratch.plots import plot_comparison, save_figure

COMPARISON_TABLE, COMPARISON_FIGURE = "comparison.md", "comparison.png"


def compare(settings: FinetuneSettings, methods: tuple[str, ...] = COMPARED_METHODS,
            command: str = "") -> dict[str, dict]:
    """Run several methods (any of METHODS) with the same data and seed; write comparison.md and .png.

    `settings.lora_config` and `settings.loraplus_lr_ratio` apply to the LoRA methods (lora, dora).
    `command`, if given, is the shell command that made the comparison, quoted under the table.
    """
    out = Path(settings.out) if settings.out is not None else Path("runs") / "compare"
    ratio = settings.loraplus_lr_ratio
    results = {m: finetune(dataclasses.replace(
        settings, method=m, out=out / m, lora_config=settings.lora_config if m in LORA_METHODS else None,
        loraplus_lr_ratio=ratio if m in LORA_METHODS else None)) for m in methods}
    first = next(iter(results.values()))
    setting, run = f"{first['model_name']}, {first['data']}", first["settings"]
    header = ("| method | trainable parameters | test accuracy | validation accuracy | training time | "
              "peak memory | saved file |\n|---|---:|---:|---:|---:|---:|---:|\n")
    rows = "".join(
        f"| {m} | {r['trainable_parameters']:,} of {r['base_parameters']:,} | "
        f"{format_accuracy(r['test_accuracy'], r['test_examples'])} | "
        f"{format_accuracy(r['validation_accuracy'], r['validation_examples'])} | "
        f"{r['train_time_s']:.0f} s | {r['peak_memory_mb']:,.0f} MB | {r['saved_file_mb']:,.1f} MB |\n"
        for m, r in results.items())
    note = (f"\n{setting}; {run['epochs']} epochs, batch {run['batch_size']}, seed {run['seed']}, "
            f"device {run['device']}; peak memory is the {first['peak_memory_kind']}. Accuracies on "
            f"{first['test_examples']:,} test and {first['validation_examples']:,} validation messages, with "
            "their 95% Wilson interval.\n")
    if ratio is not None:
        note += f"LoRA+ on the LoRA methods: B's learning rate is {ratio:g} times A's.\n"
    if command:
        note += f"Command: `{command}`\n"
    with atomic_path(out / COMPARISON_TABLE) as temporary:
        temporary.write_text(header + rows + note)
    save_figure(plot_comparison(results, f"Methods compared ({setting})"), COMPARISON_FIGURE, out)
    plt.close("all")
    print(header + rows + note)
    return results
