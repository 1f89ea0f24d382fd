"""LoRA from scratch: the low-rank layer, injection into a GPT, freezing, counting, merging, adapter files.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a pretrained weight W
frozen and learns a low-rank update delta_W = A @ B next to it: y = x W + scaling * (x A B). With
A of shape (in_dim, rank) and B of shape (rank, out_dim), a 768 x 768 layer at rank 16 trains 24,576
numbers instead of 589,824. `LoRAConfig(use_dora=True)` adds DoRA's trained magnitudes (`llm_scratch.dora`).

The usual recipe (adapter files: `llm_scratch.adapters`):
    config = LoRAConfig(rank=16, alpha=16, modules_to_save=("out_head",))
    replace_linear_with_lora(model, config)      # wrap the Linear layers in the blocks
    mark_only_lora_trainable(model, config)      # train A, B (and the new head), nothing else
    parameter_summary(model)                     # trainable 2,655,746 of 124,441,346 (2.13%)
    save_lora(model, "spam.safetensors", config, model_name="gpt2-small")
    load_lora(fresh_model, "spam.safetensors")   # injects the layers and loads A, B and the head
    merge_lora(model)                            # plain Linear layers again, for inference
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from llm_scratch.dora import DoRAMagnitude
from llm_scratch.lora_config import ALL_TARGETS, BLOCKS_PREFIX, TARGET_GROUPS, LoRAConfig
from llm_scratch.model import count_parameters
from llm_scratch.nf4 import LinearNF4


class LoRALayer(nn.Module):
    """The low-rank update alone: x -> scaling * (dropout(x) @ A @ B), A (in_dim, rank), B (rank, out_dim).

    Scaling is alpha / rank (rsLoRA: alpha / sqrt(rank)), as in the LoRA paper and PEFT. Multiplying by
    plain alpha instead makes the first updates grow with the rank, so every new rank needs a new learning
    rate; dividing by the rank cancels that growth (notebook 04 measures it).
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config = LoRAConfig(rank, alpha, dropout, use_rslora)  # checks the numbers
        self.rank = rank
        self.alpha = config.alpha
        self.use_rslora = use_rslora
        # rsLoRA (Kalajdzievski 2023): alpha / sqrt(rank) keeps learning stable at large ranks too.
        self.scaling = config.scaling
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))  # (in_dim, rank)
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))  # (rank, out_dim)
        # A is initialized like the weight of nn.Linear(in_dim, rank): Kaiming-uniform, a=sqrt(5), fan-in
        # in_dim, so values in +-1/sqrt(in_dim), the same distribution as PEFT. Initializing A.T rather
        # than A gets that fan-in (on A, Kaiming would use fan-in = rank). B = 0: the layer starts as a no-op.
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))
        # Dropout acts on the LoRA branch's input only; the frozen layer always sees the clean x.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in_dim) @ (in_dim, rank) -> (..., rank) @ (rank, out_dim) -> (..., out_dim); never builds the
        # full A @ B. The scaling multiplies the small (..., rank) tensor rather than the big output.
        return (self.dropout(x) @ self.A * self.scaling) @ self.B

    def delta_weight(self) -> torch.Tensor:
        """The update scaling * A @ B as one (in_dim, out_dim) matrix (nn.Linear stores its transpose)."""
        return self.scaling * (self.A @ self.B)

    def extra_repr(self) -> str:
        rs = ", rsLoRA" if self.use_rslora else ""
        in_dim, out_dim = self.A.shape[0], self.B.shape[1]
        return f"in_dim={in_dim}, out_dim={out_dim}, rank={self.rank}, alpha={self.alpha:g}{rs}"


class LinearWithLoRA(nn.Module):
    """An `nn.Linear` (to be frozen by `mark_only_lora_trainable`) plus a `LoRALayer`: linear(x) + lora(x);
    with `use_dora`, also DoRA's `magnitude`, which rescales every output feature (`llm_scratch.dora`).
    QLoRA: `linear` may be a 4-bit `LinearNF4` (`llm_scratch.nf4`); A and B stay float32 and train as usual.

    `merge()` folds the update into the linear's weight (no extra cost at inference) and `unmerge()` takes
    it out again. Merging is explicit: `model.eval()` does not merge.
    """

    def __init__(self, linear: nn.Linear | LinearNF4, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False) -> None:
        super().__init__()
        if isinstance(linear, LinearWithLoRA):
            raise ValueError("this layer already has LoRA; wrap the plain nn.Linear only once")
        if not isinstance(linear, (nn.Linear, LinearNF4)):
            raise ValueError(f"LinearWithLoRA wraps an nn.Linear (or a 4-bit LinearNF4), got "
                             f"{type(linear).__name__}")
        if use_dora and isinstance(linear, LinearNF4):
            raise ValueError("DoRA needs the base weight in full precision; use LoRA on a 4-bit base")
        self.linear = linear
        # Created on the linear's device and dtype, so a meta-device model stays on meta (instant counts).
        device, dtype = ((linear.weight.device, linear.weight.dtype) if isinstance(linear, nn.Linear)
                         else (linear.packed.device, torch.float32))  # a 4-bit layer computes in float32
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, dropout, use_rslora,
                              device=device, dtype=dtype)
        self.magnitude = DoRAMagnitude(linear.weight) if use_dora else None  # m, one per output feature
        self.merged = False  # True while the update sits inside linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)  # (..., out_dim): the update is already in the weight
        if self.magnitude is not None:
            return self.magnitude(x, self.linear, self.lora)  # DoRA: m / ||W + delta|| * x (W + delta)^T + b
        # linear(x) + lora(x), added in place: the linear layer's backward never needs its own output, and
        # not allocating a third (..., out_dim) tensor per layer cuts LoRA's peak training memory on a CPU
        # by about a fifth (benchmarks/RESULTS.md).
        if isinstance(self.linear, nn.Linear):
            return self.linear(x).add_(self.lora(x))  # (..., out_dim)
        # A 4-bit base saves nothing for backward, so its product goes last: with checkpointing, backward
        # recomputes a block's forward pass only as far as the last tensor saved, and the block's last
        # product (the feed-forward's second layer) is then not computed again.
        update = self.lora(x)  # (..., out_dim)
        return self.linear(x).add_(update)  # (..., out_dim)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * (A @ B)^T (DoRA: m * that / its row norms), in place. Never merges twice."""
        if isinstance(self.linear, LinearNF4):
            raise RuntimeError("LoRA cannot be merged into a 4-bit base without rounding the sum to 4 bits "
                               "again; load the base model in full precision, load this adapter into it "
                               "(llm_scratch.adapters.load_lora) and merge there")
        if not self.merged:
            if self.magnitude is not None:
                self.linear.weight.copy_(self.magnitude.merged_weight(self.linear, self.lora))  # (out, in)
            else:
                self.linear.weight += self.lora.delta_weight().T.to(self.linear.weight.dtype)  # (out, in)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the weight again (before more training). Does nothing if not merged."""
        if self.merged:
            if self.magnitude is not None:
                self.linear.weight.copy_(self.magnitude.unmerged_weight(self.linear, self.lora))  # (out, in)
            else:
                self.linear.weight -= self.lora.delta_weight().T.to(self.linear.weight.dtype)  # (out, in)
            self.merged = False


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """Does the module called `name` (e.g. "blocks.3.att.W_query") match one of `targets`?"""
    for target in targets:
        if target == ALL_TARGETS:
            if name.startswith(BLOCKS_PREFIX):
                return True
        elif target in TARGET_GROUPS:
            if name.startswith(BLOCKS_PREFIX) and name.rsplit(".", 1)[-1] in TARGET_GROUPS[target]:
                return True
        elif name == target or name.endswith("." + target):  # a full name or a suffix such as "att.out_proj"
            return True
    return False


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (e.g. the tied embedding and output head)."""
    holders = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    return {key for key, count in holders.items() if count > 1}


def find_lora_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The names of the `nn.Linear` layers that `config.target_modules` selects."""
    wanted = config.target_modules
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}
    found, already = [], []
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA) and _matches(name, wanted):
            already.append(name)
        elif isinstance(module, (nn.Linear, LinearNF4)) and name.rpartition(".")[0] not in wrapped:
            if _matches(name, wanted):
                found.append(name)
    if already:
        raise ValueError(f"{len(already)} of the selected layers already have LoRA (e.g. {already[0]!r}); a "
                         "layer is wrapped only once. Use a fresh model, pick other targets, or call "
                         "merge_lora(model) first.")
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        shown = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "") if linears else "none"
        raise ValueError(
            f"no nn.Linear layer matched target_modules={list(wanted)!r}. Use a group "
            f"({', '.join(TARGET_GROUPS)}, all: "
            f"every Linear in model.blocks) or layer names / name endings. The model's Linear layers: {shown}"
        )
    return found


def replace_linear_with_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Swap the `nn.Linear` layers `config` targets for `LinearWithLoRA`, in place; return their names.

    target_modules: "all" (every Linear in model.blocks, not the output/classification head), "attention"
    (W_query, W_key, W_value, out_proj), "feedforward" (fc1, fc2), full names ("blocks.11.ff.fc2") and
    name endings ("out_proj", "att.W_value"). With `config.quantize_base="nf4"` (QLoRA) each chosen
    nn.Linear is replaced by a frozen 4-bit copy first; a `LinearNF4` already there is wrapped as it is.
    """
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"replace_linear_with_lora takes a LoRAConfig, got {type(config).__name__}; "
                         "e.g. replace_linear_with_lora(model, LoRAConfig(rank=16, alpha=16))")
    selected = find_lora_targets(model, config)  # checks everything before the model is touched
    shared = _shared_weights(model)
    for name in selected:
        if id(getattr(model.get_submodule(name), "weight", None)) in shared:  # (a LinearNF4 has no weight)
            raise ValueError(f"{name!r} shares its weight with another layer (GPT-2 ties out_head to "
                             "tok_emb), so merging LoRA into it would change both. Replace the head with a "
                             "new nn.Linear first, or leave it out of the targets.")
    chosen = set(selected)
    replaced: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:  # the classic recursive walk over named_children
        for child_name, child in module.named_children():
            full_name = prefix + child_name
            if full_name in chosen:
                if config.quantize_base and isinstance(child, nn.Linear):  # QLoRA: a frozen 4-bit copy
                    child = LinearNF4.from_linear(child)
                wrapped = LinearWithLoRA(child, config.rank, config.alpha, config.dropout, config.use_rslora,
                                         config.use_dora)
                setattr(module, child_name, wrapped)
                replaced.append(full_name)
            elif not isinstance(child, LinearWithLoRA):
                visit(child, full_name + ".")

    visit(model, "")
    return replaced


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """Every `LinearWithLoRA` in `model`, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def freeze(model: nn.Module) -> None:
    """Make every parameter of `model` untrainable (requires_grad=False)."""
    model.requires_grad_(False)


def submodule(model: nn.Module, name: str) -> nn.Module:
    """`model.get_submodule(name)`, with an error that lists the model's top-level modules."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children())
        raise ValueError(f"the model has no module {name!r}; its top-level modules are: {children}") from None


def mark_only_lora_trainable(model: nn.Module, config: LoRAConfig) -> None:
    """Freeze everything, then make the LoRA A and B (and DoRA's m) trainable, plus `config.modules_to_save`.

    `modules_to_save` names whole modules that must learn too, e.g. ("out_head",) for a new head.
    """
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("the model has no LoRA layers; call replace_linear_with_lora(model, ...) first")
    extra = [submodule(model, name) for name in config.modules_to_save]  # check all before changing any
    freeze(model)
    for layer in layers.values():
        layer.requires_grad_(True)  # A, B and DoRA's magnitude, ...
        layer.linear.requires_grad_(False)  # ... not the pretrained weight they adapt
    for module in extra:
        module.requires_grad_(True)


@dataclass(frozen=True)
class ParameterSummary:
    """Parameter counts of a model; each tensor counts once, however many layers share it."""

    trainable: int  # parameters the optimizer will update
    total: int  # every parameter, LoRA's A and B included
    lora: int  # the A and B matrices alone
    magnitude: int = 0  # DoRA's magnitude vectors: one number per output feature of each LoRA layer
    quantized: int = 0  # weights and biases of 4-bit base layers (buffers, not Parameters), in total too

    @property
    def base(self) -> int:
        """The model without its LoRA matrices and magnitudes: what full fine-tuning would train."""
        return self.total - self.lora - self.magnitude

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.base:,} ({self.percent:.2f}%)"


def parameter_summary(model: nn.Module, *, verbose: bool = True) -> ParameterSummary:
    """Count trainable, total and LoRA parameters and print one line, e.g. trainable 2,655,746 of 124,441,346.

    The "of" is the model without its LoRA matrices, so the percentage compares with full fine-tuning. A
    4-bit base layer (QLoRA) keeps its weight and bias as buffers; each still counts as one parameter (though
    a weight takes about 4.13 bits), so a 4-bit model counts as many as the same model in full precision.
    """
    layers = lora_layers(model).values()
    quantized = sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
                    for m in model.modules() if isinstance(m, LinearNF4))
    summary = ParameterSummary(
        trainable=count_parameters(model, trainable_only=True), total=count_parameters(model) + quantized,
        quantized=quantized,
        lora=sum(p.numel() for layer in layers for p in layer.lora.parameters()),
        magnitude=sum(layer.magnitude.m.numel() for layer in layers if layer.magnitude is not None),
    )
    if verbose:
        print(summary)
    return summary


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRA update into its weight and put the plain `nn.Linear` back; return the layer names.

    The merged model computes the same outputs at the cost of the base model, with no trace of LoRA left.
    """
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("the model has no LoRA layers to merge (was merge_lora already called?)")
    for name, layer in layers.items():
        layer.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.linear)
    return list(layers)


