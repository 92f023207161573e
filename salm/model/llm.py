"""Load the decoder-only LLM from a local directory, optionally wrapped with PEFT LoRA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from salm.errors import SALMConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def load_llm(
    path: str | Path, pretrained_weights: bool, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """``AutoModelForCausalLM`` from a local dir: its weights, or random init from its ``config.json``."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise SALMConfigError(
            f"`model.pretrained_llm` is {str(path)!r}, which has no config.json. Point it to a local "
            "Hugging Face model directory (hub names are not downloaded)."
        )
    if pretrained_weights:
        if not any((path / name).exists() for name in WEIGHT_FILES):
            raise SALMConfigError(
                f"`model.pretrained_weights` is true but {str(path)!r} has no weights "
                f"({', '.join(WEIGHT_FILES)}). Add them, or set model.pretrained_weights=false for random init."
            )
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def validate_lora(cfg: DictConfig) -> LoraConfig:
    """Check the ``lora`` section and turn it into a PEFT ``LoraConfig``."""
    values = OmegaConf.to_container(cfg, resolve=True)
    if int(values.get("r", 0)) <= 0:
        raise SALMConfigError(f"`model.lora.r` must be > 0, got {values.get('r')}")
    if float(values.get("lora_alpha", 1)) <= 0:
        raise SALMConfigError(f"`model.lora.lora_alpha` must be > 0, got {values.get('lora_alpha')}")
    if not 0.0 <= float(values.get("lora_dropout", 0.0)) < 1.0:
        raise SALMConfigError(
            f"`model.lora.lora_dropout` must be in [0, 1), got {values.get('lora_dropout')}"
        )
    if not values.get("target_modules"):
        raise SALMConfigError("`model.lora.target_modules` must list module names, e.g. [q_proj, v_proj]")
    try:
        return LoraConfig(**values)
    except TypeError as error:
        raise SALMConfigError(f"`model.lora` has an unknown field: {error}") from error


def base_causal_lm(llm: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The transformers model under an optional PEFT wrapper."""
    return llm.get_base_model() if isinstance(llm, PeftModel) else llm


@contextmanager
def embedding_inside(llm: PreTrainedModel | PeftModel, embed_tokens: torch.nn.Embedding) -> Iterator[None]:
    """Temporarily put ``embed_tokens`` back into the LLM (HF ``generate`` and PEFT look for it there).

    The SALM keeps the embedding outside the LLM, as NeMo does, so its state-dict key is
    ``embed_tokens.weight`` and sharding hooks on the LLM never see it.
    """
    decoder = base_causal_lm(llm).model
    decoder.embed_tokens = embed_tokens
    try:
        yield
    finally:
        del decoder.embed_tokens


@contextmanager
def attention_implementation(config, name: str) -> Iterator[None]:
    """The LLM runs the attention registered as ``name`` (transformers' ``AttentionInterface``) inside:
    the greedy decoder's and the packed loss's own attention, while ``config`` keeps its configured one
    for everything else."""
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = saved


def install_lora(llm: PreTrainedModel, embed_tokens: torch.nn.Embedding, lora: LoraConfig) -> PeftModel:
    """Wrap ``llm`` with LoRA adapters (state-dict keys ``base_model.model...lora_A.default.weight``)."""
    with embedding_inside(llm, embed_tokens):
        return get_peft_model(llm, lora)
