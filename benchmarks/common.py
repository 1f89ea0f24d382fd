"""What every benchmark script shares: the machine it ran on, timing things in turn, and the real data.

Timing in turn: the compared steps run A, B, A, B, ..., so that a busy moment of the machine slows them
alike; a ratio is the median of the per-round ratios (the two steps of a round ran seconds apart, under the
same load), which passes over the bursts of other work.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llm_scratch.data import SMS_FILE_NAME, default_sms_dir


def machine_description() -> str:
    """CPU model, cores, threads and library versions: what a reader needs to compare a table with theirs."""
    import transformers  # a test-only dependency: imported when a benchmark runs

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return (f"{cpu}, {torch.get_num_threads()} torch threads on {os.cpu_count()} cores; "
            f"torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def process_memory_mb(field: str) -> float:
    """A field of /proc/self/status (Linux) in MB: VmRSS (resident now) or VmHWM (the peak of VmRSS)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def times_in_turn(steps: dict[str, Callable[[], object]], warmup: int,
                  repeats: int) -> tuple[dict[str, list[float]], dict[str, list[object]]]:
    """Run the callables in turn A, B, A, B, ... for `warmup + repeats` rounds; return the seconds of each in
    each timed round, and what each returned in every round (losses, tokens, ...)."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    returned: dict[str, list[object]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            returned[name].append(step())
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds, returned


def medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    """The median of each list of timings."""
    return {name: statistics.median(times) for name, times in seconds.items()}


def median_ratio(top: list[float], bottom: list[float]) -> float:
    """The median of the per-round ratios top / bottom (rounds timed in turn, see `times_in_turn`)."""
    return statistics.median(a / b for a, b in zip(top, bottom, strict=True))


def sms_spam_file() -> Path:
    """Where the whole SMS Spam Collection lies once downloaded: the package's data cache ($LLM_SCRATCH_DATA,
    see llm_scratch/config.py), which `make run` fills; pass --data-path to use another copy."""
    return default_sms_dir() / SMS_FILE_NAME
