"""OpenAI's pretrained GPT-2 weights: download (cached), load onto `GPTModel` strictly, and export.

The checkpoint's layout (which tensor goes where) is in `checkpoint.py`; this module moves the bytes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from torch import nn

from llm_scratch.checkpoint import (
    HF_CONFIG_FILE,
    HF_WEIGHTS_FILE,
    N_HEADS_METADATA_KEY,
    block_of,
    check_layout,
    gpt2_mapping,
    hf_to_ours,
    infer_config,
    normalize_keys,
    ours_to_hf,
    read_checkpoint_header,
)
from llm_scratch.config import PRESETS, GPTConfig, pick_device
from llm_scratch.files import require_finite, save_safetensors
from llm_scratch.model import GPTModel
from llm_scratch.nf4 import quantize_linears

# The four sizes OpenAI released, as Hugging Face hosts them (safetensors files, no TensorFlow needed).
HF_REPOS: dict[str, str] = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


def download_gpt2(model_name: str = "gpt2-small", cache_dir: str | Path | None = None) -> Path:
    """Path of GPT-2's model.safetensors in the Hugging Face cache, downloading it (resumably) if needed."""
    if model_name not in HF_REPOS:
        raise ValueError(f"unknown GPT-2 size {model_name!r}; valid names: {', '.join(HF_REPOS)}")
    repo = HF_REPOS[model_name]
    try:
        return Path(hf_hub_download(repo_id=repo, filename=HF_WEIGHTS_FILE, cache_dir=cache_dir))
    except Exception as err:  # network, SSL, proxy, HTTP and offline-cache errors all come through here
        cache = Path(cache_dir) if cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)
        offline = " (HF_HUB_OFFLINE is set: only the cache was read)" if hf_constants.HF_HUB_OFFLINE else ""
        url = f"{hf_constants.ENDPOINT}/{repo}/resolve/main/{HF_WEIGHTS_FILE}"
        raise RuntimeError(
            f"could not get {HF_WEIGHTS_FILE} of the Hugging Face repo {repo} ({model_name}) into the cache "
            f"folder {cache}{offline}: {type(err).__name__}: {err}\n"
            "Three ways on:\n"
            f"  1. download {url} another way (a browser, another network) and pass the file:\n"
            f"     load_gpt2({model_name!r}, weights_path='path/to/{HF_WEIGHTS_FILE}')\n"
            "  2. use a mirror: set the environment variable HF_ENDPOINT (e.g. HF_ENDPOINT=https://hf-mirror.com)\n"
            "     and unset HF_HUB_OFFLINE, before starting Python (in Jupyter: restart the kernel)\n"
            "  3. run in quick mode (LLM_SCRATCH_QUICK=1): a tiny model made and loaded locally, no network"
        ) from err


def load_gpt2(
    model_name: str | None = None,
    *,
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    nf4_layers: Iterable[str] = (),
) -> GPTModel:
    """A `GPTModel` holding GPT-2's pretrained weights, in eval mode.

    Without `weights_path`: downloads (once, then cached) the Hugging Face file of `model_name` (default
    "gpt2-small"). With `weights_path`: reads that file; `model_name` (any preset) is then optional, and if
    given, is checked against the file. Every tensor is checked (ValueError names the first bad one): names
    and shapes before any is read, then no NaN or infinity. Half-precision files (float16 or bfloat16 copies
    of GPT-2) load as float32.

    `nf4_layers` names Linear layers of the blocks ("blocks.0.att.W_query", ...) to store in 4-bit NF4 as
    they are read (QLoRA's base): each becomes the `LinearNF4.from_linear` of its weights, and the process
    never holds more than one block of them in float32.
    """
    device = pick_device(str(device))  # a clear error now for a device this machine lacks
    if weights_path is None:
        path = download_gpt2(model_name or "gpt2-small", cache_dir)
    else:
        path = Path(weights_path)
        if model_name is not None and model_name not in PRESETS:
            raise ValueError(f"unknown preset {model_name!r}; valid presets: {', '.join(PRESETS)}")
    cfg, file_key = _checked_layout(path, model_name)  # all names and shapes are right from here on

    # Build on the meta device (shapes only, no memory, no random init), then take the loaded tensors as
    # the parameters themselves (assign=True) instead of copying them into freshly allocated ones.
    with torch.device("meta"):
        model = GPTModel(cfg)
    to_quantize = _block_linears(model, nf4_layers)

    # Read tensor by tensor. safetensors maps the file into memory, and every page read counts in the
    # process's memory until the file is closed; so the file is opened once per block (the embeddings, each
    # transformer block, the final norm): we hold the weights converted so far plus one block's pages of
    # the file, never two full copies. (Opening it once per tensor would cost ~10 ms x 580 for gpt2-xl.)
    for _, rules in itertools.groupby(gpt2_mapping(cfg), key=lambda rule: block_of(rule.hf_key)):
        part: dict[str, torch.Tensor] = {}
        with safe_open(path, framework="pt") as f:
            for rule in rules:
                ours = hf_to_ours(rule, _as_float32(f.get_tensor(file_key[rule.hf_key]), rule.hf_key, path))
                part.update({key: tensor.to(device) for key, tensor in ours.items()})
        model.load_state_dict(part, strict=False, assign=True)
        read = [name for name in to_quantize if not model.get_submodule(name).weight.is_meta]
        quantize_linears(model, read)  # this block's float32 weights are freed here
        to_quantize = [name for name in to_quantize if name not in read]
    model.out_head.weight = model.tok_emb.weight  # GPT-2's output head is its token embedding
    unread = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
              if tensor.is_meta]
    if unread:  # check_layout has checked every name; this would be a mapping that misses one
        raise RuntimeError(f"{path}: no tensor was read for {unread[:3]}")
    if "lm_head.weight" in file_key:  # a stored copy of the tied head
        _check_tied_head(path, file_key["lm_head.weight"], model.tok_emb.weight)
    return model.eval()


def _check_tied_head(path: Path, key: str, token_embedding: torch.Tensor) -> None:
    """A stored copy of the tied output head must equal the token embedding (ValueError if not)."""
    with safe_open(path, framework="pt") as f:
        lm_head = _as_float32(f.get_tensor(key), key, path)
    if not torch.equal(lm_head.to(token_embedding.device), token_embedding):
        raise ValueError(f"{path}: {key} differs from wte.weight, but GPT-2's output head is tied to its "
                         "token embedding (as GPTModel's is); this is not a GPT-2 checkpoint")


def _checked_layout(path: Path, model_name: str | None) -> tuple[GPTConfig, dict[str, str]]:
    """The checkpoint's config (`model_name`'s preset, checked, or inferred from the file) and the name in the
    file of each tensor by its short name ("h.0.attn.c_attn.weight"); ValueError for a wrong name or shape."""
    raw_shapes, metadata = read_checkpoint_header(path)
    shapes = normalize_keys(raw_shapes, path)
    if model_name is not None:
        cfg, wanted = PRESETS[model_name], f"the preset {model_name!r}"
    else:
        cfg = infer_config(shapes, metadata, path)
        wanted = f"a GPT-2 of {cfg.n_layers} layers, emb_dim {cfg.emb_dim}"
    check_layout(shapes, cfg, path, wanted)
    return cfg, {key.removeprefix("transformer."): key for key in raw_shapes}


def _block_linears(model: GPTModel, names: Iterable[str]) -> list[str]:
    """`names`, checked to be Linear layers inside `model.blocks` (the tied output head cannot be 4-bit)."""
    names = list(names)
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    outside = [name for name in names if name not in linears or not name.startswith("blocks.")]
    if outside:
        raise ValueError(f"nf4_layers: {outside[:3]} are not Linear layers of the blocks; name them as "
                         "model.named_modules() does, e.g. 'blocks.0.att.W_query'")
    return names


def _as_float32(tensor: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """A checkpoint tensor as float32, which the model computes in: half-precision copies (float16,
    bfloat16) convert exactly; integers are refused, and so are NaN and infinity."""
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: tensor {name!r} holds {tensor.dtype} values, not weights; this is not a "
                         "GPT-2 checkpoint (a quantized one cannot be loaded here)")
    tensor = tensor.float()  # every float16 and bfloat16 value is exactly a float32 value
    require_finite(tensor, name, path)
    return tensor


def save_gpt2_safetensors(model: GPTModel, path: str | Path, *, hf_config: bool = False) -> Path:
    """Write `model` in the Hugging Face GPT-2 layout, readable by `load_gpt2` and by transformers.

    The number of heads goes into the file's metadata. `hf_config=True` also writes a config.json next to
    the file, so that `GPT2LMHeadModel.from_pretrained(folder)` can load it (name the file model.safetensors).
    """
    if model.out_head.weight is not model.tok_emb.weight:
        raise ValueError("the model's output head is not the token embedding (a classifier head?); GPT-2's "
                         "layout stores only the tied head, so this model cannot be saved in it")
    path = save_safetensors(gpt2_tensors(model), path,
                            metadata={"format": "pt", N_HEADS_METADATA_KEY: str(model.cfg.n_heads)})
    if hf_config:
        path.with_name(HF_CONFIG_FILE).write_text(json.dumps(hf_config_dict(model.cfg), indent=2) + "\n")
    return path


def gpt2_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's embeddings, blocks and final norm as GPT-2's checkpoint names them ("wte.weight",
    "h.0.attn.c_attn.weight", ...), each a contiguous CPU tensor; the output head is not among them."""
    cfg = model.cfg
    params = dict(model.named_parameters(remove_duplicate=False))
    if not cfg.qkv_bias:  # GPT-2 always has q/k/v biases; zeros compute the same as no bias
        for i in range(cfg.n_layers):
            for w in ("W_query", "W_key", "W_value"):
                params[f"blocks.{i}.att.{w}.bias"] = torch.zeros(cfg.emb_dim)
    rules = gpt2_mapping(cfg)
    missing = [key for rule in rules for key in rule.ours if key not in params]
    if missing:
        raise ValueError(f"the model has no parameter {missing[0]!r}, so it is not a plain GPTModel; for a "
                         "model with LoRA layers, merge the adapters into the base weights first")
    return {rule.hf_key: ours_to_hf(rule, params) for rule in rules}


def hf_config_dict(cfg: GPTConfig) -> dict:
    """The Hugging Face GPT2Config (as a config.json dict) describing the same model as `cfg`."""
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "activation_function": "gelu_new",  # the tanh approximation, as our GELU
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "tie_word_embeddings": True,
    }
    # GPT-2's <|endoftext|> (id 50256) exists only in its full vocabulary.
    config["bos_token_id"] = config["eos_token_id"] = 50256 if cfg.vocab_size > 50256 else None
    return config


__all__ = ["HF_CONFIG_FILE", "HF_REPOS", "HF_WEIGHTS_FILE", "download_gpt2", "gpt2_tensors", "hf_config_dict",
           "load_gpt2", "save_gpt2_safetensors"]
