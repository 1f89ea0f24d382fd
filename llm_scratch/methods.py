"""The fine-tuning methods: which parameters each one trains, and the learning rate it takes.

full: every parameter; last-block: the last transformer block, the final norm and the head; lora: new low-rank
matrices beside the Linear layers and the new head; dora: LoRA with a trained magnitude per output feature;
qlora: LoRA beside Linear layers stored in 4 bits (NF4, `llm_scratch.nf4`).
"""

from __future__ import annotations

import dataclasses

import torch

from llm_scratch.lora import LoRAConfig, mark_only_lora_trainable, replace_linear_with_lora
from llm_scratch.model import GPTModel

METHODS = ("full", "last-block", "lora", "dora", "qlora")
LORA_METHODS = ("lora", "dora", "qlora")  # they train an adapter (dora: + magnitudes, qlora: on a 4-bit base)
COMPARED_METHODS = ("full", "last-block", "lora")  # what `compare` runs unless told otherwise
# AdamW learning rates. Full and last-block fine-tuning move pretrained weights, so they take the small step
# usual for fine-tuning a pretrained transformer (5e-5). LoRA trains only new matrices (and the new head),
# starting from B = 0; with alpha = rank the update of W is A @ B itself, and a 10x larger step lets it grow
# in a few epochs, as is common for LoRA; DoRA and QLoRA, LoRA with magnitudes or on a 4-bit base, take the
# same. Quick mode trains a tiny model with random weights from scratch, which needs larger steps still.
LEARNING_RATES = {"full": 5e-5, "last-block": 5e-5, "lora": 5e-4, "dora": 5e-4, "qlora": 5e-4}
QUICK_LEARNING_RATES = {"full": 2e-3, "last-block": 2e-3, "lora": 5e-3, "dora": 5e-3, "qlora": 5e-3}
# LoRA for classification: beside every Linear of the blocks, and the new head trains in full.
CLASSIFIER_LORA = LoRAConfig(rank=16, alpha=16.0, modules_to_save=("out_head",))


def prepare_for_method(
    model: GPTModel, method: str, lora_config: LoRAConfig = CLASSIFIER_LORA, seed: int = 123
) -> list[str]:
    """Decide which parameters train: every one (full), the last block + final norm + head (last-block),
    or new LoRA matrices where `lora_config` says + its modules_to_save (lora; dora: + DoRA's magnitudes).
    Returns the names trained.

    `seed` fixes the random start of LoRA's A matrices: the same seed, the same adapter at step 0.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in LORA_METHODS:
        torch.manual_seed(seed)
        lora_config = method_lora_config(method, lora_config)
        replace_linear_with_lora(model, lora_config)
        mark_only_lora_trainable(model, lora_config)
    else:
        trained_parts = (f"blocks.{len(model.blocks) - 1}.", "final_norm.", "out_head.")
        for name, param in model.named_parameters():
            param.requires_grad = method == "full" or name.startswith(trained_parts)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def method_lora_config(method: str, lora_config: LoRAConfig) -> LoRAConfig:
    """The LoRAConfig a LoRA method trains with: `lora_config` with use_dora set for method "dora" and the
    base quantized to NF4 for method "qlora"; a config that says otherwise is refused."""
    if lora_config.use_dora and method != "dora":
        raise ValueError(f"the LoRAConfig says use_dora=True but the method is {method!r}: choose method "
                         "'dora'")
    if lora_config.quantize_base and method != "qlora":
        raise ValueError(f"the LoRAConfig says quantize_base={lora_config.quantize_base!r} but the method is "
                         f"{method!r}: choose method 'qlora'")
    return dataclasses.replace(lora_config, use_dora=method == "dora",
                               quantize_base="nf4" if method == "qlora" else None)
