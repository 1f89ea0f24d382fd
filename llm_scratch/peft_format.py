"""LoRA and DoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`,
which `peft.PeftModel.from_pretrained` loads onto `GPT2LMHeadModel` or `GPT2ForSequenceClassification`.

Our GPT has three Linear layers for query, key and value; Hugging Face's GPT-2 computes all three with one
Conv1D, `c_attn` (emb_dim -> 3 x emb_dim). LoRA on the three becomes LoRA on c_attn without any loss:

    A_c = [A_q A_k A_v]  (emb_dim, 3 rank)      B_c = diag(B_q, B_k, B_v)  (3 rank, 3 emb_dim)
    x A_c B_c = [x A_q B_q, x A_k B_k, x A_v B_v]

Rank 3r would change the scaling alpha / r, so c_attn gets alpha 3 x alpha (rsLoRA, alpha / sqrt(r):
sqrt(3) x alpha) through PEFT's `rank_pattern` and `alpha_pattern`. A projection without LoRA gets zero
blocks; DoRA's magnitude of c_attn is the three magnitudes side by side. Importing reverses this, and takes
an adapter PEFT trained (c_attn of rank r, dense B) as A and a slice of B for each of query, key and value.

The classification head: Hugging Face's `score` has no bias, ours (`add_classification_head`) has one. No
adapter can carry that bias, so export refuses such a head; a head made without bias exports exactly:
`model.out_head = nn.Linear(model.cfg.emb_dim, num_classes, bias=False)` before training.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from llm_scratch.adapters import apply_lora_state, lora_state_dict
from llm_scratch.checkpoint import gpt2_mapping
from llm_scratch.files import atomic_path, save_safetensors
from llm_scratch.lora import LinearWithLoRA, LoRAConfig, lora_layers
from llm_scratch.model import GPTModel

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's name of the Hugging Face model inside a PeftModel
HEAD, HF_HEAD = "out_head", "score"  # the classification head, ours and Hugging Face's
FUSED = "attn.c_attn"  # Hugging Face's query, key and value in one layer


def hf_modules(model: GPTModel) -> dict[str, list[str]]:
    """Each Linear layer of Hugging Face's GPT-2 blocks -> our layers inside it, from the checkpoint layout:
    "transformer.h.0.attn.c_attn" -> ["blocks.0.att.W_query", "blocks.0.att.W_key", "blocks.0.att.W_value"].
    """
    modules = {}
    for rule in gpt2_mapping(model.cfg):
        if rule.transpose:  # a weight: of a Conv1D there, of a Linear here
            ours = [name.removesuffix(".weight") for name in rule.ours]
            modules["transformer." + rule.hf_key.removesuffix(".weight")] = ours
    return modules


def _base_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The frozen (out, in) weight of our Linear layer `name`, wrapped in LoRA or not."""
    module = model.get_submodule(name)
    return (module.linear if isinstance(module, LinearWithLoRA) else module).weight.detach()


def _head_state(model: GPTModel, config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The tensors of `modules_to_save` that PEFT's GPT-2 can take: none, or the classification head's."""
    unsupported = [name for name in config.modules_to_save if name != HEAD]
    if unsupported:
        raise ValueError(f"modules_to_save={unsupported} has no counterpart in PEFT's GPT-2 here; only "
                         f"'{HEAD}' (the classification head, Hugging Face's '{HF_HEAD}') is exported")
    if not config.modules_to_save:
        return {}
    head = model.out_head
    if head.weight is model.tok_emb.weight:
        raise ValueError("out_head is the language-model head (tied to tok_emb), not a classification head; "
                         "leave it out of modules_to_save")
    if head.bias is not None:
        raise ValueError("the classification head has a bias, and Hugging Face's "
                         "GPT2ForSequenceClassification.score has none, so the adapter would not be exact. "
                         "Train with a head without bias: model.out_head = torch.nn.Linear("
                         "model.cfg.emb_dim, num_classes, bias=False), before replace_linear_with_lora")
    return {"weight": head.weight.detach()}  # (num_classes, emb_dim) in both


def save_peft_adapter(model: GPTModel, folder: str | Path, config: LoRAConfig, *,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write the LoRA/DoRA adapter of `model` as PEFT's adapter_config.json + adapter_model.safetensors.

    `PeftModel.from_pretrained(hf_model, folder)` then computes what `model` computes, when `hf_model` holds
    the same base weights. Returns the folder.
    """
    state = lora_state_dict(model, config)  # checks the layers against config; raises if there are none
    layers, modules = lora_layers(model), hf_modules(model)
    outside = sorted(set(layers) - {name for names in modules.values() for name in names})
    if outside:
        raise ValueError(f"LoRA on {outside[:3]} has no counterpart in Hugging Face's GPT-2 blocks; export "
                         "LoRA on the Linear layers of the blocks only")
    tensors = {f"{PREFIX}{HF_HEAD}.{key}": value for key, value in _head_state(model, config).items()}
    used = {hf_module: names for hf_module, names in modules.items() if any(n in layers for n in names)}
    for hf_module, names in used.items():  # names: one layer, or query, key and value for c_attn
        some = next(name for name in names if name in layers)
        a_blocks, b_blocks, magnitudes = [], [], []
        for name in names:
            if name in layers:
                a_blocks.append(state[f"{name}.lora.A"])  # (in, rank)
                b_blocks.append(state[f"{name}.lora.B"])  # (rank, out)
                magnitudes.append(state.get(f"{name}.magnitude.m"))  # (out,)
            else:  # a projection without LoRA: zero blocks, and (DoRA) m = ||W|| so that DoRA's scale is 1
                a_blocks.append(torch.zeros_like(state[f"{some}.lora.A"]))
                b_blocks.append(torch.zeros_like(state[f"{some}.lora.B"]))
                magnitudes.append(torch.linalg.vector_norm(_base_weight(model, name), dim=1)
                                  if config.use_dora else None)
        key = f"{PREFIX}{hf_module}."
        tensors[key + "lora_A.weight"] = torch.cat(a_blocks, dim=1).T  # (parts x rank, in)
        tensors[key + "lora_B.weight"] = torch.block_diag(*b_blocks).T  # (parts x out, parts x rank)
        if config.use_dora:
            tensors[key + "lora_magnitude_vector"] = torch.cat(magnitudes)  # (parts x out,)

    folder = Path(folder)
    fused = any(len(names) > 1 for names in used.values())
    peft_config = {**_peft_config(model, config, sorted(used), fused),
                   "base_model_name_or_path": base_model_name_or_path}
    with atomic_path(folder / PEFT_CONFIG_FILE) as temporary:
        temporary.write_text(json.dumps(peft_config, indent=2) + "\n")
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    save_safetensors(tensors, folder / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    return folder


def _peft_config(model: GPTModel, config: LoRAConfig, modules: list[str], fused: bool) -> dict:
    """PEFT's LoraConfig as JSON, for LoRA on the Hugging Face `modules` (full names)."""
    # Name endings ("attn.c_attn") when every block has the same layers, else full names.
    endings = sorted({name.split(".", 3)[3] for name in modules})  # "transformer.h.0.attn.c_attn"
    every_block = len(modules) == len(endings) * model.cfg.n_layers
    alpha_fused = config.alpha * (math.sqrt(3) if config.use_rslora else 3)  # the same scaling at rank 3r
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if config.modules_to_save else "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "target_modules": endings if every_block else modules,
        "modules_to_save": [HF_HEAD] if config.modules_to_save else None,
        "rank_pattern": {"c_attn": 3 * config.rank} if fused else {},
        "alpha_pattern": {"c_attn": alpha_fused} if fused else {},
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores its weight as (in, out)
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rule for rank_pattern and alpha_pattern: the first key that matches the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft_adapter(model: GPTModel, folder: str | Path) -> LoRAConfig:
    """Load a PEFT LoRA/DoRA adapter of Hugging Face GPT-2 into `model`, injecting our LoRA layers.

    Every layer must end up with the same rank and scaling, as one LoRAConfig says; returns that config.
    """
    folder = Path(folder)
    peft_config, modules, head = _read_peft_adapter(folder)
    use_dora, use_rslora = bool(peft_config.get("use_dora")), bool(peft_config.get("use_rslora"))
    ours_of = hf_modules(model)  # Hugging Face module -> our layers in it (query, key, value for c_attn)
    unknown = [m for m in modules if m not in ours_of]
    if unknown:
        raise ValueError(f"{folder}: LoRA on {unknown[:3]}, which this model's blocks do not have; load the "
                         "adapter into a model of the size it was trained on")
    # The rank of our layers: that of the unfused layers (c_attn may hold three blocks of it).
    ranks = {lora_a.shape[0] for m, (lora_a, _, _) in modules.items() if not m.endswith(FUSED)}
    if len(ranks) > 1:
        raise ValueError(f"{folder}: the adapter's layers have ranks {sorted(ranks)}; one LoRAConfig holds "
                         "one rank")
    rank = ranks.pop() if ranks else peft_config.get("r", 8)  # 8: PEFT's default
    lora_alpha = peft_config.get("lora_alpha", 8)
    state = {f"{HEAD}.{key}": tensor for key, tensor in head.items()}  # our names -> tensors
    settings: dict[str, tuple[int, float]] = {}  # our layer -> its (rank, scaling)
    for hf_module in [m for m in ours_of if m in modules]:  # in the model's order
        lora_a, lora_b, magnitude = modules[hf_module]
        if use_dora and magnitude is None:
            raise ValueError(f"{folder}: use_dora is set but {hf_module} has no lora_magnitude_vector")
        alpha = _pattern_value(peft_config.get("alpha_pattern") or {}, hf_module, lora_alpha)
        scaling = alpha / (math.sqrt(lora_a.shape[0]) if use_rslora else lora_a.shape[0])
        parts = _split(hf_module, lora_a, lora_b, magnitude, rank, folder)
        for name, (a, b, m) in zip(ours_of[hf_module], parts, strict=True):
            if not a.any() and not b.any() and (m is None or torch.allclose(
                    m, torch.linalg.vector_norm(_base_weight(model, name), dim=1), rtol=1e-6)):
                continue  # the zero block `save_peft_adapter` writes for a projection without LoRA
            state[f"{name}.lora.A"], state[f"{name}.lora.B"] = a.T, b.T  # (in, rank), (rank, out)
            if use_dora:
                state[f"{name}.magnitude.m"] = m  # (out,)
            settings[name] = (a.shape[0], scaling)
    rank, scaling = next(iter(settings.values()))
    if any(r != rank or not math.isclose(s, scaling, rel_tol=1e-9) for r, s in settings.values()):
        raise ValueError(f"{folder}: the adapter's layers have different ranks or scalings "
                         f"{sorted(set(settings.values()))}; one LoRAConfig holds one of each")
    alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
    alpha = lora_alpha if math.isclose(alpha, lora_alpha, rel_tol=1e-9) else alpha  # 16, not 16.0000000001
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=float(peft_config.get("lora_dropout") or 0.0),
                        use_rslora=use_rslora, use_dora=use_dora, target_modules=tuple(settings),
                        modules_to_save=(HEAD,) if head else ())
    apply_lora_state(model, config, list(settings), state, str(folder))
    return config


def _split(module: str, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor | None,
           rank: int, folder: Path) -> list[tuple]:
    """A (rank, in), B (out, rank) and m (out,) of each of our layers in the Hugging Face `module`."""
    if not module.endswith(FUSED):
        return [(lora_a, lora_b, magnitude)]
    out_dim = lora_b.shape[0] // 3
    rows = [slice(i * out_dim, (i + 1) * out_dim) for i in range(3)]  # query, key, value in c_attn's output
    magnitudes = [None if magnitude is None else magnitude[r] for r in rows]
    if lora_a.shape[0] == rank:  # as PEFT trains it: one A for the three, each its slice of B
        return [(lora_a, lora_b[r], m) for r, m in zip(rows, magnitudes, strict=True)]
    cols = [slice(i * rank, (i + 1) * rank) for i in range(3)]  # as `save_peft_adapter` writes it
    if lora_a.shape[0] != 3 * rank or not torch.equal(
            torch.block_diag(*(lora_b[r, c] for r, c in zip(rows, cols, strict=True))), lora_b):
        raise ValueError(f"{folder}: {module} has rank {lora_a.shape[0]}, the other layers {rank}, and its B "
                         "is not block-diagonal, so query, key and value would need another rank than the "
                         "other layers; one LoRAConfig holds one rank")
    return [(lora_a[c], lora_b[r, c], m) for r, c, m in zip(rows, cols, magnitudes, strict=True)]


def _read_peft_adapter(folder: Path) -> tuple[dict, dict[str, tuple], dict[str, torch.Tensor]]:
    """adapter_config.json; each Hugging Face module's (lora_A, lora_B, magnitude or None); the head's
    tensors ({"weight": ...}). Refuses what this loader cannot load."""
    config_path, weights_path = folder / PEFT_CONFIG_FILE, folder / PEFT_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {folder}; pass the folder that PEFT's "
                                    "save_pretrained (or save_peft_adapter) wrote")
    peft_config = json.loads(config_path.read_text())
    refused = [key for key, bad in (("peft_type", peft_config.get("peft_type") != "LORA"),
                                    ("bias", peft_config.get("bias", "none") != "none"),
                                    ("lora_bias", bool(peft_config.get("lora_bias")))) if bad]
    if refused:
        raise ValueError(f"{config_path}: the settings {refused} are not supported; this loads LoRA and DoRA "
                         "adapters (peft_type LORA) without trained biases")
    tensors = {key.removeprefix(PREFIX): value for key, value in load_file(str(weights_path)).items()}
    head = {key.removeprefix(f"{HF_HEAD}."): t for key, t in tensors.items() if key.startswith(f"{HF_HEAD}.")}
    endings = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
    names = sorted({key.rsplit(".lora_", 1)[0] for key in tensors if ".lora_" in key})
    modules = {name: tuple(tensors.pop(name + ending, None) for ending in endings) for name in names}
    others = sorted(key for key in tensors if not key.startswith(f"{HF_HEAD}."))
    broken = [m for m, (lora_a, lora_b, _) in modules.items() if lora_a is None or lora_b is None]
    if others or broken or not modules:
        raise ValueError(f"{weights_path}: no LoRA tensors, or tensors this loader does not know "
                         f"{others[:5]}, or modules without both lora_A and lora_B {broken[:5]}")
    return peft_config, modules, head
