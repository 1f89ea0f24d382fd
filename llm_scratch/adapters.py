"""LoRA adapter files: only the trained tensors (A, B, DoRA's m, `modules_to_save`), with their `LoRAConfig`.

An adapter is a safetensors file whose metadata holds the `LoRAConfig` as JSON, the names of the wrapped
layers and the base model's name, so `load_lora` can rebuild the same layers in a fresh base model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from llm_scratch.files import read_safetensors, save_safetensors
from llm_scratch.lora import LinearWithLoRA, LoRAConfig, lora_layers, replace_linear_with_lora, submodule
from llm_scratch.nf4 import LinearNF4

ADAPTER_FORMAT = "llm-scratch-lora"
ADAPTER_VERSION = "2"  # 2: one LoRAConfig as JSON; 1 (llm-scratch 0.1): loose settings per layer, still read


def modules_to_save_state(model: nn.Module, modules_to_save: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of the whole modules trained alongside LoRA (e.g. "out_head.weight", "out_head.bias")."""
    return {f"{name}.{key}": tensor
            for name in modules_to_save for key, tensor in submodule(model, name).state_dict().items()}


def lora_state_dict(model: nn.Module, config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The LoRA tensors ("blocks.0.att.W_query.lora.A", ...), DoRA's magnitudes ("...magnitude.m") and the
    tensors of `config.modules_to_save`, after checking that every LoRA layer was made with `config`."""
    state = {}
    for name, layer in lora_layers(model).items():
        _check_layer(name, layer, config, "save with the config the layers were made with")
        state[f"{name}.lora.A"] = layer.lora.A.detach()  # (in_dim, rank)
        state[f"{name}.lora.B"] = layer.lora.B.detach()  # (rank, out_dim)
        if layer.magnitude is not None:
            state[f"{name}.magnitude.m"] = layer.magnitude.m.detach()  # (out_dim,)
    if not state:
        raise RuntimeError("the model has no LoRA layers; call replace_linear_with_lora(model, ...) first")
    state.update(modules_to_save_state(model, config.modules_to_save))
    return state


def _check_layer(name: str, layer: LinearWithLoRA, config: LoRAConfig, what_to_do: str) -> None:
    """Raise unless the LoRA layer `name` has the rank, alpha, rsLoRA, DoRA of `config` and is not merged."""
    lora, dora = layer.lora, layer.magnitude is not None
    if (lora.rank, lora.alpha, lora.use_rslora, dora) != (config.rank, config.alpha, config.use_rslora,
                                                          config.use_dora):
        raise ValueError(f"{name!r} already has LoRA with rank={lora.rank}, alpha={lora.alpha:g}, rsLoRA="
                         f"{lora.use_rslora}, DoRA={dora}, but the config says rank={config.rank}, alpha="
                         f"{config.alpha:g}, rsLoRA={config.use_rslora}, DoRA={config.use_dora}; "
                         f"{what_to_do}")
    if layer.merged:
        raise RuntimeError(f"{name!r} is merged; call unmerge() on it first")


def save_lora(model: nn.Module, path: str | Path, config: LoRAConfig, *, model_name: str = "") -> Path:
    """Save only the adapter (A and B of every LoRA layer, DoRA's m, `config.modules_to_save`) as safetensors.

    The metadata (the config as JSON, the wrapped layers, the base model's name) lets `load_lora` re-inject
    the same layers into a fresh base model.
    """
    state = lora_state_dict(model, config)  # raises if there is no LoRA layer or one differs from config
    layers = lora_layers(model)
    metadata = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "model_name": model_name,
        "lora_config": json.dumps(dataclasses.asdict(config)),
        "layers": json.dumps(list(layers)),
    }
    # safetensors wants contiguous CPU tensors that share no memory with each other.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    return save_safetensors(tensors, path, metadata)


def _json_field(raw: dict, key: str, path: Path):
    try:
        return json.loads(raw[key])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path}: the adapter's metadata field {key!r} is missing or damaged; "
                         "re-save the adapter with save_lora") from None


def _from_version_1(raw: dict, path: Path) -> dict:
    """The metadata of an llm-scratch 0.1 adapter (settings per layer, `also`) in today's form."""
    layers, also = _json_field(raw, "layers", path), _json_field(raw, "also", path)
    settings = {(s["rank"], s["alpha"], s["use_rslora"], s.get("dropout", 0.0)) for s in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"{path} is an llm-scratch 0.1 adapter whose layers have different ranks or alphas "
                         f"({sorted(settings)}), which one LoRAConfig cannot describe. Load it with "
                         "llm-scratch 0.1, then save one adapter per setting, or retrain it")
    rank, alpha, use_rslora, dropout = settings.pop()
    config = LoRAConfig(rank, alpha, dropout, use_rslora, target_modules=tuple(layers),
                        modules_to_save=tuple(also))
    return {"model_name": raw.get("base_model", ""), "lora_config": config, "layers": list(layers)}


def read_lora_metadata(path: str | Path) -> dict:
    """An adapter file's metadata: `model_name`, `lora_config` (a LoRAConfig) and `layers` (their names)."""
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
                         "metadata); write adapters with llm_scratch.adapters.save_lora")
    if raw.get("version") == "1":
        return _from_version_1(raw, path)
    if raw.get("version") != ADAPTER_VERSION:
        raise ValueError(f"{path} is an adapter of format version {raw.get('version')!r}; this llm-scratch "
                         f"reads versions 1 and {ADAPTER_VERSION} (update the package or re-save the "
                         "adapter)")
    try:
        config = LoRAConfig(**_json_field(raw, "lora_config", path))
    except (TypeError, ValueError) as error:  # TypeError: a field this version does not know
        raise ValueError(f"{path}: the adapter's lora_config is invalid: {error}") from None
    return {"model_name": raw.get("model_name", ""), "lora_config": config,
            "layers": _json_field(raw, "layers", path)}


def _expected_shapes(model: nn.Module, config: LoRAConfig, layers: list[str], source: str) -> dict:
    """The shape of every A, B (and DoRA's m) the adapter must hold, after checking each layer takes it."""
    expected: dict[str, tuple[int, ...]] = {}
    for name in layers:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter {source} has a LoRA layer {name!r} that this model lacks; load "
                             "it into the same kind of model it was trained on") from None
        if isinstance(module, LinearWithLoRA):
            _check_layer(name, module, config, "load into a fresh base model")
            linear = module.linear
        elif isinstance(module, (nn.Linear, LinearNF4)):  # full precision, or already in 4 bits
            linear = module
        else:
            raise ValueError(f"the adapter puts LoRA on {name!r}, which is a {type(module).__name__} here, "
                             "not an nn.Linear; load it into the model it was trained on")
        expected[f"{name}.lora.A"] = (linear.in_features, config.rank)
        expected[f"{name}.lora.B"] = (config.rank, linear.out_features)
        if config.use_dora:
            expected[f"{name}.magnitude.m"] = (linear.out_features,)
    return expected


def load_lora(model: nn.Module, path: str | Path, *, model_name: str | None = None) -> LoRAConfig:
    """Load an adapter written by `save_lora` into `model`, injecting the LoRA layers where needed.

    Checks the file's layers, keys, shapes, metadata and values (no NaN or infinity) against the model
    before changing anything; pass `model_name` to also check the base model's name saved with the adapter.
    Returns the adapter's config. The base stays as `model` holds it: an adapter trained on a 4-bit base
    (quantize_base="nf4") loads into a full-precision base as any LoRA adapter does.
    """
    meta = read_lora_metadata(path)
    config, layers = meta["lora_config"], meta["layers"]
    if model_name is not None and meta["model_name"] and meta["model_name"] != model_name:
        raise ValueError(f"{path} was trained on base model {meta['model_name']!r}, not {model_name!r}; "
                         "load it into the model it was made for")
    saved_from = f" (saved from {meta['model_name']!r})" if meta["model_name"] else ""
    file_state = read_safetensors(path)  # refuses NaN and infinity
    apply_lora_state(model, config, layers, file_state, f"{path}{saved_from}")
    return config


def apply_lora_state(model: nn.Module, config: LoRAConfig, layers: list[str],
                     file_state: dict[str, torch.Tensor], source: str) -> None:
    """Put an adapter's tensors (named as `lora_state_dict` names them) into `model`, injecting the LoRA
    `layers` where needed. Checks every layer, key and shape first; `source` names the adapter in errors."""
    # 1. Every layer named in the file exists here, as a plain Linear or as a LoRA layer with equal settings.
    expected = _expected_shapes(model, config, layers, source)
    saved_modules = modules_to_save_state(model, config.modules_to_save)  # e.g. the classification head

    # 2. The file holds exactly those tensors, with those shapes.
    missing = sorted(set(expected) - set(file_state))
    saved_prefixes = tuple(name + "." for name in config.modules_to_save)
    unexpected = sorted(k for k in file_state if k not in expected and not k.startswith(saved_prefixes))
    if missing or unexpected:
        raise ValueError(f"the adapter {source} does not match its own config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; the file is damaged or was not written for it")
    for key, shape in expected.items():
        if tuple(file_state[key].shape) != shape:
            raise ValueError(f"{key}: the adapter has shape {tuple(file_state[key].shape)} but this model "
                             f"needs {shape}")
    for module_name, prefix in zip(config.modules_to_save, saved_prefixes, strict=True):
        in_file = {k: tuple(v.shape) for k, v in file_state.items() if k.startswith(prefix)}
        in_model = {k: tuple(v.shape) for k, v in saved_modules.items() if k.startswith(prefix)}
        if in_file != in_model:
            raise ValueError(f"{module_name}: the adapter holds {in_file} but this model has {in_model} "
                             "(replace that module, e.g. the classification head, with the one trained "
                             "with the adapter)")

    # 3. Everything checked: inject what is missing (around the base layers as they are, quantized or not)
    # and copy the tensors in.
    plain = tuple(name for name in layers if not isinstance(model.get_submodule(name), LinearWithLoRA))
    if plain:
        replace_linear_with_lora(model, dataclasses.replace(config, target_modules=plain, quantize_base=None))
    with torch.no_grad():
        for name in layers:
            layer = model.get_submodule(name)
            layer.lora.A.copy_(file_state[f"{name}.lora.A"])
            layer.lora.B.copy_(file_state[f"{name}.lora.B"])
            if config.use_dora:
                layer.magnitude.m.copy_(file_state[f"{name}.magnitude.m"])
        for key, tensor in saved_modules.items():
            tensor.copy_(file_state[key])
