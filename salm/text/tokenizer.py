"""Load the LLM's Hugging Face tokenizer from a local directory and register the audio placeholder."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from salm.errors import SALMConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str | Path, audio_locator_tag: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory and add ``audio_locator_tag`` as one special token.

    NeMo's SALM adds the tag the same way, so token ids (and checkpoints) stay interchangeable.
    Never reaches a hub: only local directories are accepted.
    """
    path = Path(path)
    if not path.is_dir():
        raise SALMConfigError(
            f"Tokenizer directory {str(path)!r} does not exist. Set `model.tokenizer_path` (or "
            "`model.pretrained_llm`) to a local directory holding the LLM's tokenizer files."
        )
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise SALMConfigError(
            f"Directory {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). "
            "Copy the LLM's tokenizer files there, or set `model.tokenizer_path` to a directory that has them."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [audio_locator_tag]})
    return tokenizer


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for left padding: pad, else unk, else 0 (NeMo's SALM falls back the same way)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return token_id
    return 0
