"""Initialise the perception from a NeMo ASR ``.nemo`` (``model.pretrained_asr``), as NeMo's SALM does.

Only two members are read: ``model_config.yaml`` (the preprocessor and encoder configs) and
``model_weights.ckpt`` (through ``torch.load(weights_only=True)``); the ASR model itself (its
decoder, tokenizer, Lightning machinery) is never built, so this works offline and fast.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from salm.errors import CheckpointError, SALMConfigError
from salm.io.nemo_file import MODEL_CONFIG, TORCH_WEIGHTS, extracted_archive, load_torch_file
from salm.model.perception import AudioPerception

ASR_PARTS = ("preprocessor", "encoder")


def _asr_file(nemo_path: str | Path) -> Path:
    path = Path(nemo_path)
    if not path.is_file():
        raise SALMConfigError(
            f"`model.pretrained_asr` is {str(nemo_path)!r}, which is not a local file. Point it to a NeMo "
            "ASR .nemo file (hub names are not downloaded), or set it to null to train the encoder from scratch."
        )
    return path


def perception_config_from_asr(nemo_path: str | Path, perception_cfg: DictConfig) -> DictConfig:
    """``perception_cfg`` with ``preprocessor`` and ``encoder`` taken from the ASR model's config.

    Encoder keys the user set (non-null) override the ASR model's, e.g. a different
    ``att_context_size``: the same rule as NeMo's ``setup_speech_encoder``.
    """
    path = _asr_file(nemo_path)
    with extracted_archive(path, members={MODEL_CONFIG}) as root:
        if not (root / MODEL_CONFIG).exists():
            raise CheckpointError(f"{str(path)!r} is not a NeMo model: it has no {MODEL_CONFIG}")
        asr_cfg = OmegaConf.load(root / MODEL_CONFIG)
    for part in ASR_PARTS:
        if asr_cfg.get(part) is None:
            raise CheckpointError(
                f"{str(path)!r} has no `{part}` section in {MODEL_CONFIG}: is it an ASR model?"
            )
    user_encoder = perception_cfg.get("encoder")
    user_values = OmegaConf.to_container(user_encoder, resolve=True) if user_encoder is not None else {}
    overrides = {k: v for k, v in user_values.items() if v is not None}
    merged = OmegaConf.merge(perception_cfg, {"preprocessor": None, "encoder": None})
    merged.preprocessor = asr_cfg.preprocessor
    merged.encoder = OmegaConf.merge(asr_cfg.encoder, overrides)
    return merged


def load_asr_weights(perception: AudioPerception, nemo_path: str | Path) -> None:
    """Copy the ASR model's ``preprocessor.*`` and ``encoder.*`` weights into ``perception``.

    The encoder must match exactly (every key, every shape). Preprocessor tensors are fixed
    buffers (window, filterbank) that some ASR checkpoints omit; those present must fit.
    """
    path = _asr_file(nemo_path)
    with extracted_archive(path, members={TORCH_WEIGHTS}) as root:
        if not (root / TORCH_WEIGHTS).exists():
            raise CheckpointError(f"{str(path)!r} has no {TORCH_WEIGHTS}; is it a complete NeMo .nemo file?")
        state_dict = load_torch_file(root / TORCH_WEIGHTS)
        for part in ASR_PARTS:
            module = getattr(perception, part)
            prefix = f"{part}."
            weights = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
            expected = module.state_dict()
            missing = sorted(set(expected) - set(weights)) if part == "encoder" else []
            unexpected = sorted(set(weights) - set(expected))
            wrong_shape = sorted(
                k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape
            )
            if missing or unexpected or wrong_shape:
                raise CheckpointError(
                    f"the {part} weights in {str(path)!r} do not fit `model.perception.{part}`: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}, different shape {wrong_shape[:5]}"
                )
            module.load_state_dict(weights, strict=False)
