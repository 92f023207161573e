"""The model config: NeMo SALM's field names, checked up front with errors that name the field.

The same dict is what canary-qwen-2.5b publishes as ``config.json``, what our ``.nemo`` holds as
``model_config.yaml`` and what the ``model:`` section of a training recipe holds.
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from salm.errors import SALMConfigError

AUDIO_LOCATOR_TAG = "<|audioplaceholder|>"  # canary-qwen-2.5b's audio placeholder


def asr_prompt(audio_locator_tag: str = AUDIO_LOCATOR_TAG) -> str:
    """canary-qwen-2.5b's transcription instruction around ``audio_locator_tag``: the prompt of its
    training data, and what inference uses when none is given."""
    return f"Transcribe the following: {audio_locator_tag}"


DEFAULTS = {
    "pretrained_weights": True,
    "tokenizer_path": None,
    "pretrained_asr": None,
    "prompt_format": "qwen",
    "audio_locator_tag": AUDIO_LOCATOR_TAG,
    "freeze_params": [],
    "prevent_freeze_params": [],
}
LORA_PARAM_PATTERN = r"^.+\.lora_.+$"


def model_config(cfg: dict | DictConfig) -> DictConfig:
    """Merge defaults into ``cfg`` and validate it; returns a new ``DictConfig``."""
    if not isinstance(cfg, (dict, DictConfig)):
        raise SALMConfigError(f"the model config must be a mapping, got {type(cfg).__name__}")
    merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg)
    missing = [
        key
        for key in ("pretrained_llm", "perception")
        if OmegaConf.is_missing(merged, key) or merged.get(key) is None
    ]
    if missing:
        raise SALMConfigError(f"the model config needs {', '.join('`model.' + k + '`' for k in missing)}")
    tag = merged.audio_locator_tag
    if not isinstance(tag, str) or not tag.strip():
        raise SALMConfigError(f"`model.audio_locator_tag` must be a non-empty string, got {tag!r}")
    for field in ("freeze_params", "prevent_freeze_params"):
        if not isinstance(merged[field], (list, ListConfig)):
            raise SALMConfigError(f"`model.{field}` must be a list of regexes, got {merged[field]!r}")
    return merged


def trainable_patterns(cfg: DictConfig) -> list[str]:
    """``prevent_freeze_params`` plus the LoRA pattern NeMo appends when LoRA is on."""
    patterns = list(cfg.prevent_freeze_params)
    if cfg.get("lora") and LORA_PARAM_PATTERN not in patterns:
        patterns.append(LORA_PARAM_PATTERN)
    return patterns
