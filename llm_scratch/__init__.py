"""llm-scratch: a from-scratch GPT-2 in PyTorch, with LoRA fine-tuning, made for teaching."""

from llm_scratch.attention import MultiHeadAttention, causal_attention
from llm_scratch.config import PRESETS, GPTConfig
from llm_scratch.generate import generate
from llm_scratch.model import GELU, FeedForward, GPTModel, LayerNorm, TransformerBlock, count_parameters
from llm_scratch.tokenizer import EOS_ID, get_tokenizer, ids_to_text, text_to_ids

__all__ = [
    "EOS_ID",
    "GELU",
    "PRESETS",
    "FeedForward",
    "GPTConfig",
    "GPTModel",
    "LayerNorm",
    "MultiHeadAttention",
    "TransformerBlock",
    "causal_attention",
    "count_parameters",
    "generate",
    "get_tokenizer",
    "ids_to_text",
    "text_to_ids",
]
