"""`LoRAConfig`: the one description of a LoRA adapter (rank, alpha, which layers, ...), checked once, here.

`llm_scratch.lora` builds the layers it describes; `llm_scratch.adapters` saves it beside the trained tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Named groups of layers for `target_modules`; the names are those of llm_scratch.model and .attention.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("W_query", "W_key", "W_value", "out_proj"),  # the four attention projections
    "feedforward": ("fc1", "fc2"),  # the two layers of the feed-forward network
}
ALL_TARGETS = "all"  # every nn.Linear inside model.blocks: attention and feed-forward, not the head
BLOCKS_PREFIX = "blocks."
QUANTIZED_BASES = ("nf4",)  # how `quantize_base` may store the frozen Linear layers (QLoRA: llm_scratch.nf4)


@dataclass(frozen=True)
class LoRAConfig:
    """Everything that describes a LoRA adapter, checked once, here; saved with the adapter as JSON.

    The names follow Hugging Face PEFT's `LoraConfig` where they fit; PEFT calls rank `r`, alpha `lora_alpha`
    and dropout `lora_dropout`.
    """

    rank: int = 16  # r: the inner size of A (in_dim, rank) and B (rank, out_dim)
    alpha: float = 16.0  # the update is scaled by alpha / rank (rsLoRA: alpha / sqrt(rank))
    dropout: float = 0.0  # dropout on the LoRA branch's input
    use_rslora: bool = False  # rank-stabilized scaling (Kalajdzievski 2023)
    use_dora: bool = False  # DoRA (Liu et al. 2024): a trained magnitude per output feature, llm_scratch.dora
    # Which Linear layers get LoRA: groups ("all", "attention", "feedforward"), full names
    # ("blocks.11.ff.fc2") or name endings ("out_proj", "att.W_value").
    target_modules: tuple[str, ...] = (ALL_TARGETS,)
    modules_to_save: tuple[str, ...] = ()  # whole modules trained alongside, e.g. ("out_head",)
    # QLoRA: "nf4" stores each wrapped Linear's frozen weight in 4 bits (llm_scratch.nf4); None keeps it.
    quantize_base: str | None = None

    def __post_init__(self) -> None:
        rank, alpha, dropout = self.rank, self.alpha, self.dropout
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r} (typical: 4, 8, 16, 32)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r} (a common choice: "
                             "alpha = rank)")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.quantize_base is not None and self.quantize_base not in QUANTIZED_BASES:
            raise ValueError(f"quantize_base must be None (full precision) or one of {QUANTIZED_BASES}, got "
                             f"{self.quantize_base!r}")
        if self.quantize_base and self.use_dora:
            raise ValueError("DoRA (use_dora=True) needs the base weight's row norms in full precision; "
                             "train DoRA on a full-precision base (quantize_base=None)")
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            names = (value,) if isinstance(value, str) else tuple(value)
            if (name == "target_modules" and not names) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"LoRAConfig.{name} must be a list of module names (target_modules: at "
                                 f"least one, or a group), got {value!r}")
            object.__setattr__(self, name, names)  # a tuple, so the config stays hashable and frozen
        object.__setattr__(self, "alpha", float(alpha))

    @property
    def scaling(self) -> float:
        """The factor of the update: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
