"""GPT-2's checkpoint layout: the table from its tensors to ours, and reading and checking a file's header.

The weights come as Hugging Face's `model.safetensors` files: plain tensors with a JSON header, read with no
TensorFlow and no pickle. GPT-2's checkpoint names and layouts differ from ours in a few places;
`gpt2_mapping` lists every tensor once, and both the loader and the exporter (`pretrained.py`) follow it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from llm_scratch.config import PRESETS, GPTConfig

HF_WEIGHTS_FILE = "model.safetensors"  # a Hugging Face model's weights (GPT-2's as the Hub hosts them)
HF_CONFIG_FILE = "config.json"  # a Hugging Face model's config (a GPT2Config), beside its weights
N_HEADS_METADATA_KEY = "n_head"  # written by `save_gpt2_safetensors`: the one number shapes cannot tell


class Rule(NamedTuple):
    """One tensor of a GPT-2 checkpoint and where it goes in `GPTModel`."""

    hf_key: str  # name in the checkpoint, without the optional "transformer." prefix
    shape: tuple[int, ...]  # its shape in the checkpoint
    ours: tuple[str, ...]  # our parameter(s); three for c_attn, which holds query, key and value side by side
    transpose: bool  # GPT-2's Conv1D stores a weight as (in, out); nn.Linear stores (out, in)


def gpt2_mapping(cfg: GPTConfig) -> list[Rule]:
    """Every tensor of a GPT-2 checkpoint of config `cfg`, in checkpoint order, each listed once."""
    emb = cfg.emb_dim
    rules = [
        Rule("wte.weight", (cfg.vocab_size, emb), ("tok_emb.weight",), False),  # word token embedding
        Rule("wpe.weight", (cfg.context_length, emb), ("pos_emb.weight",), False),  # word position embedding
    ]
    for i in range(cfg.n_layers):
        h, b = f"h.{i}", f"blocks.{i}"
        qkv = ("W_query", "W_key", "W_value")
        rules += [
            # LayerNorm: GPT-2 calls the learned scale and shift "weight" and "bias".
            Rule(f"{h}.ln_1.weight", (emb,), (f"{b}.norm1.scale",), False),
            Rule(f"{h}.ln_1.bias", (emb,), (f"{b}.norm1.shift",), False),
            # c_attn: one Conv1D emb -> 3 * emb computing query, key and value at once; we split it in three.
            Rule(f"{h}.attn.c_attn.weight", (emb, 3 * emb), tuple(f"{b}.att.{w}.weight" for w in qkv), True),
            Rule(f"{h}.attn.c_attn.bias", (3 * emb,), tuple(f"{b}.att.{w}.bias" for w in qkv), False),
            Rule(f"{h}.attn.c_proj.weight", (emb, emb), (f"{b}.att.out_proj.weight",), True),
            Rule(f"{h}.attn.c_proj.bias", (emb,), (f"{b}.att.out_proj.bias",), False),
            Rule(f"{h}.ln_2.weight", (emb,), (f"{b}.norm2.scale",), False),
            Rule(f"{h}.ln_2.bias", (emb,), (f"{b}.norm2.shift",), False),
            Rule(f"{h}.mlp.c_fc.weight", (emb, 4 * emb), (f"{b}.ff.fc1.weight",), True),  # expand
            Rule(f"{h}.mlp.c_fc.bias", (4 * emb,), (f"{b}.ff.fc1.bias",), False),
            Rule(f"{h}.mlp.c_proj.weight", (4 * emb, emb), (f"{b}.ff.fc2.weight",), True),  # project back
            Rule(f"{h}.mlp.c_proj.bias", (emb,), (f"{b}.ff.fc2.bias",), False),
        ]
    rules += [
        Rule("ln_f.weight", (emb,), ("final_norm.scale",), False),
        Rule("ln_f.bias", (emb,), ("final_norm.shift",), False),
    ]
    # Not listed, on purpose: our out_head.weight is tok_emb.weight (tied), so GPT-2 files store it at most
    # as a copy, "lm_head.weight"; and attn.bias / attn.masked_bias are the causal-mask buffers of
    # Hugging Face's code, not learned weights (our attention builds its mask on the fly).
    return rules


def hf_to_ours(rule: Rule, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Turn one checkpoint tensor into our parameter(s): split c_attn in three, transpose Conv1D weights."""
    # c_attn.weight (emb_dim, 3 * emb_dim) -> three (emb_dim, emb_dim); c_attn.bias (3 * emb_dim,) -> three
    parts = tensor.chunk(len(rule.ours), dim=-1) if len(rule.ours) > 1 else (tensor,)
    out = {}
    for key, part in zip(rule.ours, parts, strict=True):
        if rule.transpose:
            part = part.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        # A contiguous copy in memory of its own: `part` may be a view of the memory-mapped file, which
        # must not stay tied to the model (the file could be overwritten later, e.g. by a save).
        out[key] = part.clone(memory_format=torch.contiguous_format)
    return out


def ours_to_hf(rule: Rule, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of `hf_to_ours`: our parameter(s) -> one checkpoint tensor in GPT-2's layout."""
    parts = [params[key].detach() for key in rule.ours]
    if rule.transpose:
        parts = [p.t() for p in parts]  # nn.Linear (out, in) -> Conv1D (in, out)
    # q, k, v side by side along the last dim: (emb_dim, 3 * emb_dim) or (3 * emb_dim,)
    tensor = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    return tensor.cpu().contiguous()


# --------------------------------------------------------------------------------------------------------
# Reading a checkpoint's header (names and shapes only) and telling which model it holds
# --------------------------------------------------------------------------------------------------------

_BUFFER_KEY = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER_KEY = re.compile(r"h\.(\d+)\.")


def block_of(hf_key: str) -> str:
    """The block a checkpoint tensor belongs to: "h.3." for block 3, "" for the embeddings and ln_f."""
    match = _LAYER_KEY.match(hf_key)
    return match.group(0) if match else ""


def read_checkpoint_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names -> shapes of every tensor in a safetensors file, and its metadata; reads no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}; check the path (it should end in .safetensors)")
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            metadata = f.metadata() or {}
    except SafetensorError as err:
        # safetensors checks the header against the file size, so a truncated download lands here too.
        raise ValueError(
            f"{path} ({path.stat().st_size:,} bytes) is not a complete safetensors file ({err}). If it was "
            "downloaded, delete it and download it again; a PyTorch .bin/.pt or TensorFlow checkpoint will "
            "not do, GPT-2's model.safetensors from Hugging Face will"
        ) from None
    return shapes, metadata


def normalize_keys(shapes: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, tuple[int, ...]]:
    """Drop the optional "transformer." prefix and the non-weight entries; each name must remain unique."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        short = key.removeprefix("transformer.")
        if _BUFFER_KEY.fullmatch(short):
            continue  # causal-mask buffer of Hugging Face's attention, not a weight
        if short in out:
            raise ValueError(f"{path} holds {short!r} twice (with and without the 'transformer.' prefix); "
                             "every weight must be set exactly once")
        out[short] = shape
    return out


def _shape_facts(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """What the shapes alone tell: vocab_size, context_length, emb_dim, n_layers (those that are present)."""
    facts = {}
    if len(shapes.get("wte.weight", ())) == 2:
        facts["vocab_size"], facts["emb_dim"] = shapes["wte.weight"]
    if len(shapes.get("wpe.weight", ())) == 2:
        facts["context_length"] = shapes["wpe.weight"][0]
    layers = [int(m.group(1)) for key in shapes if (m := _LAYER_KEY.match(key))]
    facts["n_layers"] = max(layers) + 1 if layers else 0
    return facts


def _looks_like(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A phrase naming the preset a checkpoint resembles, for error messages."""
    facts = _shape_facts(shapes)
    described = ", ".join(f"{k}={v}" for k, v in facts.items())
    for name, preset in PRESETS.items():
        if (preset.emb_dim, preset.n_layers) == (facts.get("emb_dim"), facts.get("n_layers")):
            return f"the file looks like {name!r} ({described})"
    return f"the file matches no preset ({described})"


def infer_config(
    shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], path: Path
) -> GPTConfig:
    """The config of a checkpoint given without a name: sizes from the shapes, n_heads from a side source.

    Shapes cannot tell the number of attention heads (12 heads of 64 or 6 of 128 store the same matrices).
    It comes from, in turn: the file's metadata (our exporter writes it), a Hugging Face config.json next to
    the file (`n_head`), or the preset whose other sizes all match.
    """
    facts = _shape_facts(shapes)
    if "vocab_size" not in facts or "context_length" not in facts or facts["n_layers"] == 0:
        raise ValueError(
            f"{path} is not a GPT-2 checkpoint: it lacks 'wte.weight', 'wpe.weight' or blocks 'h.0.*' "
            f"(found {len(shapes)} tensors, e.g. {sorted(shapes)[:3]}); {_looks_like(shapes)}"
        )
    sizes = {k: facts[k] for k in ("vocab_size", "context_length", "emb_dim", "n_layers")}
    n_heads = None
    if metadata.get(N_HEADS_METADATA_KEY, "").isdigit():
        n_heads = int(metadata[N_HEADS_METADATA_KEY])
    elif (config_json := path.with_name(HF_CONFIG_FILE)).is_file():
        hf_config = json.loads(config_json.read_text())
        if (hf_config.get("n_embd"), hf_config.get("n_layer")) == (sizes["emb_dim"], sizes["n_layers"]):
            n_heads = hf_config.get("n_head")
    if n_heads is None:
        for preset in PRESETS.values():
            if all(getattr(preset, k) == v for k, v in sizes.items()):
                n_heads = preset.n_heads
                break
    if n_heads is None:
        raise ValueError(
            f"cannot tell the number of attention heads of {path} ({_looks_like(shapes)}): the shapes do "
            "not say it. Pass model_name=... of a preset, or put the model's Hugging Face config.json (with "
            "'n_head') next to the file"
        )
    return GPTConfig(n_heads=n_heads, **sizes)


def check_layout(shapes: Mapping[str, tuple[int, ...]], cfg: GPTConfig, path: Path, wanted: str) -> None:
    """Raise one ValueError listing every missing, unexpected or wrongly shaped tensor (none: return)."""
    expected = {rule.hf_key: rule.shape for rule in gpt2_mapping(cfg)}
    expected["lm_head.weight"] = expected["wte.weight"]  # optional copy of the tied head
    problems = []
    for key, shape in expected.items():
        if key not in shapes and key != "lm_head.weight":
            problems.append(f"missing key {key!r}: expected shape {shape}, found none")
        elif key in shapes and shapes[key] != shape:
            problems.append(f"wrong shape for {key!r}: expected {shape}, found {shapes[key]}")
    problems += [f"unexpected key {key!r} (found shape {shape})"
                 for key, shape in shapes.items() if key not in expected]
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        shown = "\n  ".join(problems[:8]) + more
        raise ValueError(
            f"{path} does not fit {wanted}:\n  {shown}\n{_looks_like(shapes)}. If it is the file you want, "
            "pass the model_name of the preset it looks like, or leave model_name out to infer the size from "
            "the file"
        )
