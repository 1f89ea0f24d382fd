"""LoRA from scratch: the low-rank layer, injection into a GPT, freezing, counting, merging, adapter files.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a pretrained weight W
frozen and learns a low-rank update delta_W = A @ B next to it: y = x W + scaling * (x A B). With
A of shape (in_dim, rank) and B of shape (rank, out_dim), a 768 x 768 layer at rank 16 trains 24,576
numbers instead of 589,824.

The usual recipe:
    replace_linear_with_lora(model, rank=16, alpha=16)       # wrap the Linear layers in the blocks
    mark_only_lora_trainable(model, also=("out_head",))      # train A, B (and a new head), nothing else
    parameter_summary(model)                                 # trainable 2,655,746 of 124,441,346 (2.13%)
    save_lora(model, "spam.safetensors", base_model="gpt2-small", also=("out_head",))
    load_lora(fresh_model, "spam.safetensors")                # injects the layers and loads A, B, the head
    merge_lora(model)                                        # plain Linear layers again, for inference
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from llm_scratch.files import save_safetensors
from llm_scratch.model import count_parameters

# Named groups of layers for `targets`; the names are those of llm_scratch.model / llm_scratch.attention.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("W_query", "W_key", "W_value", "out_proj"),  # the four attention projections
    "feedforward": ("fc1", "fc2"),  # the two layers of the feed-forward network
}
DEFAULT_TARGETS = "all"  # every nn.Linear inside model.blocks: attention and feed-forward, not the head
BLOCKS_PREFIX = "blocks."
ADAPTER_FORMAT = "llm-scratch-lora"
ADAPTER_VERSION = "1"


class LoRALayer(nn.Module):
    """The low-rank update alone: x -> scaling * (dropout(x) @ A @ B), A (in_dim, rank), B (rank, out_dim).

    Scaling is alpha / rank (rsLoRA: alpha / sqrt(rank)), as in the LoRA paper and PEFT. The classic
    teaching code multiplies by plain alpha, so the first updates grow with the rank and every new rank needs
    a new learning rate; dividing by the rank cancels that growth (notebook 03 measures it).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_lora_settings(rank, alpha, dropout)
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        # rsLoRA (Kalajdzievski 2023): alpha / sqrt(rank) keeps learning stable at large ranks too.
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
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
    """An `nn.Linear` (to be frozen by `mark_only_lora_trainable`) plus a `LoRALayer`: linear(x) + lora(x).

    `merge()` folds the update into the linear's weight (no extra cost at inference) and `unmerge()` takes
    it out again. Merging is explicit: `model.eval()` does not merge.
    """

    def __init__(
        self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        if isinstance(linear, LinearWithLoRA):
            raise ValueError("this layer already has LoRA; wrap the plain nn.Linear only once")
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"LinearWithLoRA wraps an nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        # Created on the linear's device and dtype, so a meta-device model stays on meta (instant counts).
        self.lora = LoRALayer(
            linear.in_features, linear.out_features, rank, alpha, dropout, use_rslora,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        self.merged = False  # True while the update sits inside linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)  # (..., out_dim): the update is already in the weight
        # linear(x) + lora(x), added in place: the linear layer's backward never needs its own output, and
        # not allocating a third (..., out_dim) tensor per layer cuts LoRA's peak training memory on a CPU
        # by about a fifth (benchmarks/RESULTS.md).
        return self.linear(x).add_(self.lora(x))  # (..., out_dim)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * (A @ B)^T, in place. Does nothing if already merged (never merges twice)."""
        if not self.merged:
            self.linear.weight += self.lora.delta_weight().T.to(self.linear.weight.dtype)  # (out, in)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the weight again (before more training). Does nothing if not merged."""
        if self.merged:
            self.linear.weight -= self.lora.delta_weight().T.to(self.linear.weight.dtype)  # (out, in)
            self.merged = False


def check_lora_settings(rank: int, alpha: float, dropout: float = 0.0) -> None:
    """Raise a ValueError a student can act on when rank, alpha or dropout make no sense."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r} (typical values: 4, 8, 16, 32)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a number > 0, got {alpha!r} (a common choice: alpha = rank)")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _target_names(targets: str | Sequence[str] | None) -> list[str]:
    if targets is None:
        return [DEFAULT_TARGETS]
    if isinstance(targets, str):
        return [targets]
    names = list(targets)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"targets must be a group name or a non-empty list of layer names, got {targets!r}")
    return names


def _matches(name: str, targets: list[str]) -> bool:
    """Does the module called `name` (e.g. "blocks.3.att.W_query") match one of `targets`?"""
    for target in targets:
        if target == "all":
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
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def find_lora_targets(model: nn.Module, targets: str | Sequence[str] | None = None) -> list[str]:
    """The names of the `nn.Linear` layers that `targets` selects (see `replace_linear_with_lora`)."""
    wanted = _target_names(targets)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}
    found, already = [], []
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA) and _matches(name, wanted):
            already.append(name)
        elif isinstance(module, nn.Linear) and name.rpartition(".")[0] not in wrapped:
            if _matches(name, wanted):
                found.append(name)
    if already:
        raise ValueError(
            f"{len(already)} of the selected layers already have LoRA (e.g. {already[0]!r}); a layer is "
            "wrapped only once. Use a fresh model, pick other targets, or call merge_lora(model) first."
        )
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        shown = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "") if linears else "none"
        raise ValueError(
            f"no nn.Linear layer matched targets={wanted!r}. Use a group ({', '.join(TARGET_GROUPS)}, all: "
            f"every Linear in model.blocks) or layer names / name endings. The model's Linear layers: {shown}"
        )
    return found


def replace_linear_with_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    *,
    targets: str | Sequence[str] | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Swap the selected `nn.Linear` layers of `model` for `LinearWithLoRA`, in place; return their names.

    targets: None or "all" (every Linear in model.blocks, not the output/classification head), "attention"
    (W_query, W_key, W_value, out_proj), "feedforward" (fc1, fc2), or a list of groups, full names
    ("blocks.11.ff.fc2") and name endings ("out_proj", "att.W_value").
    """
    check_lora_settings(rank, alpha, dropout)
    selected = find_lora_targets(model, targets)  # checks everything before the model is touched
    shared = _shared_weights(model)
    for name in selected:
        if id(model.get_submodule(name).weight) in shared:
            raise ValueError(
                f"{name!r} shares its weight with another layer (GPT-2 ties out_head to tok_emb), so "
                "merging LoRA into it would change both. Replace the head with a new nn.Linear first, or "
                "leave it out of the targets."
            )
    chosen = set(selected)
    replaced: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:  # the classic recursive walk over named_children
        for child_name, child in module.named_children():
            full_name = prefix + child_name
            if full_name in chosen:
                setattr(module, child_name, LinearWithLoRA(child, rank, alpha, dropout, use_rslora))
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
    for param in model.parameters():
        param.requires_grad_(False)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children())
        raise ValueError(f"the model has no module {name!r}; its top-level modules are: {children}") from None


def mark_only_lora_trainable(model: nn.Module, also: Iterable[str] = ()) -> None:
    """Freeze everything, then make the LoRA A and B trainable, plus the modules named in `also`.

    `also` names whole modules that must learn too, e.g. ("out_head",) for a new classification head.
    """
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("the model has no LoRA layers; call replace_linear_with_lora(model, ...) first")
    extra = [_submodule(model, name) for name in also]  # check every name before changing anything
    freeze(model)
    for layer in layers.values():
        layer.lora.requires_grad_(True)
    for module in extra:
        module.requires_grad_(True)


@dataclass(frozen=True)
class ParameterSummary:
    """Parameter counts of a model; each tensor counts once, however many layers share it."""

    trainable: int  # parameters the optimizer will update
    total: int  # every parameter, LoRA's A and B included
    lora: int  # the A and B matrices alone

    @property
    def base(self) -> int:
        """The model without its LoRA matrices: what full fine-tuning would train."""
        return self.total - self.lora

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.base:,} ({self.percent:.2f}%)"


def parameter_summary(model: nn.Module, *, verbose: bool = True) -> ParameterSummary:
    """Count trainable, total and LoRA parameters and print one line, e.g. trainable 2,655,746 of 124,441,346.

    The "of" is the model without its LoRA matrices, so the percentage compares with full fine-tuning.
    """
    lora = sum(p.numel() for layer in lora_layers(model).values() for p in layer.lora.parameters())
    summary = ParameterSummary(
        trainable=count_parameters(model, trainable_only=True), total=count_parameters(model), lora=lora
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


def _also_state(model: nn.Module, also: Iterable[str]) -> dict[str, torch.Tensor]:
    state = {}
    for name in also:
        for key, tensor in _submodule(model, name).state_dict().items():
            state[f"{name}.{key}"] = tensor
    return state


def lora_state_dict(model: nn.Module, also: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The LoRA tensors ("blocks.0.att.W_query.lora.A", ...) and the tensors of the modules in `also`."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora.A"] = layer.lora.A.detach()  # (in_dim, rank)
        state[f"{name}.lora.B"] = layer.lora.B.detach()  # (rank, out_dim)
    if not state:
        raise RuntimeError("the model has no LoRA layers; call replace_linear_with_lora(model, ...) first")
    state.update(_also_state(model, also))
    return state


def save_lora(
    model: nn.Module, path: str | Path, *, base_model: str | None = None, also: Iterable[str] = ()
) -> Path:
    """Save only the adapter (A, B of every LoRA layer, plus the modules in `also`) as a safetensors file.

    The metadata (rank, alpha, rsLoRA, dropout, the wrapped layers, `also`, the base model's name) lets
    `load_lora` re-inject the layers identically into a fresh base model.
    """
    also = list(also)
    state = lora_state_dict(model, also)  # raises if there is no LoRA layer
    if any(m.merged for m in lora_layers(model).values()):
        raise RuntimeError("some LoRA layers are merged; call unmerge() on them (or save before merging)")
    layers = {
        name: {"rank": m.lora.rank, "alpha": m.lora.alpha, "use_rslora": m.lora.use_rslora,
               "dropout": float(getattr(m.lora.dropout, "p", 0.0))}
        for name, m in lora_layers(model).items()
    }
    settings = {tuple(v.values()) for v in layers.values()}
    uniform = next(iter(layers.values())) if len(settings) == 1 else None
    metadata = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "base_model": base_model or "",
        "rank": str(uniform["rank"]) if uniform else "mixed",
        "alpha": str(uniform["alpha"]) if uniform else "mixed",
        "use_rslora": str(uniform["use_rslora"]) if uniform else "mixed",
        "targets": json.dumps(list(layers)),
        "layers": json.dumps(layers),
        "also": json.dumps(also),
    }
    path = Path(path)
    # safetensors wants contiguous CPU tensors that share no memory with each other.
    save_safetensors({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, path, metadata)
    return path


def read_lora_metadata(path: str | Path) -> dict:
    """The metadata of an adapter file written by `save_lora`, with the JSON fields decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA adapter file at {path}; check the path (save_lora writes one)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    if raw.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an llm-scratch LoRA adapter (no format={ADAPTER_FORMAT!r} in its "
                         "metadata); write adapters with llm_scratch.lora.save_lora")
    if raw.get("version") != ADAPTER_VERSION:
        raise ValueError(f"{path} is an adapter of format version {raw.get('version')!r}; this llm-scratch "
                         f"reads version {ADAPTER_VERSION!r} (update the package or re-save the adapter)")
    meta = dict(raw)
    for key in ("targets", "layers", "also"):
        try:
            meta[key] = json.loads(raw[key])
        except (KeyError, json.JSONDecodeError):
            raise ValueError(f"{path}: the adapter's metadata field {key!r} is missing or damaged; "
                             "re-save the adapter with save_lora") from None
    return meta


def load_lora(model: nn.Module, path: str | Path, *, base_model: str | None = None) -> list[str]:
    """Load an adapter written by `save_lora` into `model`, injecting the LoRA layers where needed.

    Checks the file's layers, keys, shapes and metadata against the model before changing anything; pass
    `base_model` to also check the name saved with the adapter. Returns the names of the LoRA layers.
    """
    meta = read_lora_metadata(path)
    if base_model is not None and meta["base_model"] and meta["base_model"] != base_model:
        raise ValueError(f"{path} was trained on base model {meta['base_model']!r}, not {base_model!r}; "
                         "load it into the model it was made for")
    file_state = load_file(str(path))
    layers: dict[str, dict] = meta["layers"]
    saved_from = f" (saved from {meta['base_model']!r})" if meta["base_model"] else ""

    # 1. Every layer named in the file exists here, as a plain Linear or as a LoRA layer with equal settings.
    expected: dict[str, tuple[int, ...]] = {}
    for name, settings in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter{saved_from} has a LoRA layer {name!r} that this model lacks; load "
                             "it into the same kind of model it was trained on") from None
        if isinstance(module, LinearWithLoRA):
            lora = module.lora
            if (lora.rank, lora.alpha, lora.use_rslora) != (
                    settings["rank"], settings["alpha"], settings["use_rslora"]):
                raise ValueError(
                    f"{name!r} already has LoRA with rank={lora.rank}, alpha={lora.alpha:g}, rsLoRA="
                    f"{lora.use_rslora} but the adapter has rank={settings['rank']}, alpha="
                    f"{settings['alpha']:g}, rsLoRA={settings['use_rslora']}; load into a fresh base model")
            if module.merged:
                raise RuntimeError(f"{name!r} is merged; call unmerge() before loading new LoRA weights")
            linear = module.linear
        elif isinstance(module, nn.Linear):
            linear = module
        else:
            raise ValueError(f"the adapter puts LoRA on {name!r}, which is a {type(module).__name__} here, "
                             "not an nn.Linear; load it into the model it was trained on")
        expected[f"{name}.lora.A"] = (linear.in_features, settings["rank"])
        expected[f"{name}.lora.B"] = (settings["rank"], linear.out_features)
    also_state = _also_state(model, meta["also"])  # e.g. the classification head's weight and bias
    also_hint = " (replace that module, e.g. the classification head, with the one trained with the adapter)"

    # 2. The file holds exactly those tensors, with those shapes.
    missing = sorted(set(expected) - set(file_state))
    also_prefixes = tuple(name + "." for name in meta["also"])
    unexpected = sorted(k for k in file_state if k not in expected and not k.startswith(also_prefixes))
    if missing or unexpected:
        raise ValueError(f"{path} does not match its own metadata: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; the file is damaged or was not written by save_lora")
    for key, shape in expected.items():
        if tuple(file_state[key].shape) != shape:
            raise ValueError(f"{key}: the adapter has shape {tuple(file_state[key].shape)} but this model "
                             f"needs {shape}")
    for module_name in meta["also"]:
        prefix = module_name + "."
        in_file = {k: tuple(v.shape) for k, v in file_state.items()
                   if k.startswith(prefix) and k not in expected}
        in_model = {k: tuple(v.shape) for k, v in also_state.items() if k.startswith(prefix)}
        if in_file != in_model:
            raise ValueError(f"{module_name}: the adapter holds {in_file} but this model has {in_model}"
                             f"{also_hint}")

    # 3. Everything checked: inject what is missing and copy the tensors in.
    for name, settings in layers.items():
        if not isinstance(model.get_submodule(name), LinearWithLoRA):
            replace_linear_with_lora(model, settings["rank"], settings["alpha"], targets=[name],
                                     dropout=settings.get("dropout", 0.0), use_rslora=settings["use_rslora"])
    with torch.no_grad():
        for name in layers:
            lora = model.get_submodule(name).lora
            lora.A.copy_(file_state[f"{name}.lora.A"])
            lora.B.copy_(file_state[f"{name}.lora.B"])
        for key, tensor in also_state.items():
            tensor.copy_(file_state[key])
    return list(layers)
