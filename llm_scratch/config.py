"""Model sizes (the `GPTConfig` dataclass and the GPT-2 presets) and run settings (quick mode, device).

This is the one module that reads environment variables; every other module asks the functions below.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class GPTConfig:
    """Every number that fixes the shape of a GPT model."""

    vocab_size: int = 50257  # GPT-2's BPE vocabulary: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 1024  # longest sequence the position embedding covers
    emb_dim: int = 768  # width of every token vector
    n_heads: int = 12  # attention heads; each sees emb_dim // n_heads dimensions
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.0  # dropout probability (GPT-2 trained with 0.1; 0.0 is usual for fine-tuning)
    qkv_bias: bool = True  # GPT-2 has biases on the query, key and value projections

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}) so that "
                f"every head gets the same width; try n_heads in {_divisors(self.emb_dim)}"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """The config of a named preset, e.g. `GPTConfig.from_preset("gpt2-small", drop_rate=0.1)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


PRESETS: dict[str, GPTConfig] = {
    # The four sizes OpenAI released (parameter counts with the output head tied to the embedding).
    "gpt2-small": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),  # 1558M
    # A toy model with GPT-2's real vocabulary, for quick mode and tests: runs in milliseconds on a CPU.
    "tiny": GPTConfig(context_length=256, emb_dim=64, n_heads=4, n_layers=2),
}
QUICK_PRESET = "tiny"  # the model every quick-mode run trains (random weights, no download)


QUICK_ENV = "LLM_SCRATCH_QUICK"  # 1/true/yes/on: tiny model, shipped data, a few steps, no network
DATA_ENV = "LLM_SCRATCH_DATA"  # the cache folder for downloaded data (default ~/.cache/llm-scratch)
SMS_URLS_ENV = "LLM_SCRATCH_SMS_URLS"  # comma-separated URLs of the SMS Spam Collection zip, tried in order
FIGURES_ENV = "LLM_SCRATCH_FIGURES"  # where figures go (default: runs/figures; `make figures`: figures/)
RUNS_ENV = "LLM_SCRATCH_RUNS"  # where notebooks write their run files (default: the project's runs/)


def quick_mode(override: bool | None = None) -> bool:
    """Quick mode (tiny model, shipped data, a few steps, no network): `override` when it is True or False,
    else whether LLM_SCRATCH_QUICK is 1/true/yes/on."""
    if override is not None:
        if not isinstance(override, bool):
            raise ValueError(f"quick mode is True, False or None (follow {QUICK_ENV}), got {override!r}")
        return override
    return os.environ.get(QUICK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def data_dir() -> Path:
    """The cache folder for downloaded data: $LLM_SCRATCH_DATA if set, else ~/.cache/llm-scratch."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "llm-scratch"


def sms_urls_from_env() -> list[str]:
    """The URLs in $LLM_SCRATCH_SMS_URLS (comma-separated, blanks dropped); empty when it is unset."""
    return [url.strip() for url in os.environ.get(SMS_URLS_ENV, "").split(",") if url.strip()]


def _project_dir() -> Path:
    """The project's root as seen from where Python runs: the folder above `notebooks/` inside a notebook
    (also one in `notebooks/solutions/`), else the current folder."""
    cwd = Path.cwd()
    if cwd.name == "solutions" and cwd.parent.name == "notebooks":
        return cwd.parent.parent
    return cwd.parent if cwd.name == "notebooks" else cwd


def figures_dir() -> Path:
    """Where figures go: $LLM_SCRATCH_FIGURES if set, else `figures/` inside `runs_dir()`.

    Running a notebook thus never changes the committed figures in the project's `figures/` folder;
    `make figures` sets LLM_SCRATCH_FIGURES to regenerate those on purpose.
    """
    if os.environ.get(FIGURES_ENV):
        return Path(os.environ[FIGURES_ENV]).expanduser()
    return runs_dir() / "figures"


def runs_dir() -> Path:
    """Where run files go (weights, adapters, executed notebooks): $LLM_SCRATCH_RUNS, else `runs/`."""
    if os.environ.get(RUNS_ENV):
        return Path(os.environ[RUNS_ENV]).expanduser()
    return _project_dir() / "runs"


def pick_device(override: str | None = None) -> torch.device:
    """The device to compute on: `override` if given (e.g. "cpu"), else CUDA, then Apple MPS, then CPU."""
    if override:
        device = torch.device(override)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {override!r} was asked for but PyTorch sees no CUDA GPU here; "
                               "use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device {override!r} was asked for but Apple MPS is not available here; "
                               "use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
