"""The Hugging Face layout canary-qwen-2.5b is published in: ``config.json`` + ``model.safetensors``.

``config.json`` is the NeMo-style SALM model config; ``model.safetensors`` holds every weight
(tied LM head stored once, as ``huggingface_hub`` saves it). We add ``llm_backbone/`` with the
LLM's config and tokenizer so the directory loads offline; the published checkpoint lacks it,
so loading that one needs ``llm_path`` (a local Qwen3-1.7B config + tokenizer directory).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_file

from salm.errors import CheckpointError
from salm.model.llm import base_causal_lm
from salm.model.salm import SALM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LLM_BACKBONE_DIR = "llm_backbone"


def save_hf_layout(model: SALM, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as ``config.json`` + ``model.safetensors`` + ``llm_backbone/``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(model.cfg, resolve=True)
    config.setdefault("model_type", "nemo_speechlm")  # what NeMo's save_pretrained adds for HF tooling
    config.setdefault("architectures", ["NeMoSpeechLMForConditionalGeneration"])
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(unique_state_dict(model, dtype), str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    backbone = out_dir / LLM_BACKBONE_DIR
    if backbone.exists():
        shutil.rmtree(backbone)
    base_causal_lm(model.llm).config.save_pretrained(backbone)
    model.tokenizer.save_pretrained(backbone)
    return out_dir


def unique_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once under their alphabetically first name (as
    ``safetensors.torch.save_model`` does), optionally cast to ``dtype``; the model is untouched."""
    unique: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in sorted(model.state_dict().items()):
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity in seen:
            continue
        seen.add(identity)
        cast = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        unique[name] = cast.detach().contiguous().cpu()
    return unique


def load_hf_layout(
    path: str | Path, llm_path: str | Path | None = None, tokenizer_path: str | Path | None = None
) -> SALM:
    """Load a directory written by ``save_hf_layout`` or laid out like the published canary-qwen-2.5b."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).exists():
            raise CheckpointError(f"{str(path)!r} is not a SALM HF directory: {name} is missing")
    config = json.loads((path / CONFIG_FILE).read_text())
    for key in ("model_type", "architectures"):
        config.pop(key, None)
    config["pretrained_weights"] = False  # the weights come from model.safetensors
    config["pretrained_llm"] = str(_llm_dir(path, config, llm_path))
    if tokenizer_path is not None:
        config["tokenizer_path"] = str(tokenizer_path)
    elif config.get("tokenizer_path") and not Path(config["tokenizer_path"]).is_dir():
        config["tokenizer_path"] = None  # a path from the training machine: use the LLM dir's tokenizer
    model = SALM(config)
    load_weights(model, path / WEIGHTS_FILE)
    return model


def _llm_dir(path: Path, config: dict, llm_path: str | Path | None) -> Path:
    candidates = (
        [Path(llm_path)] if llm_path else [path / LLM_BACKBONE_DIR, Path(str(config.get("pretrained_llm")))]
    )
    for candidate in candidates:
        if (candidate / "config.json").exists():
            return candidate
    raise CheckpointError(
        f"{str(path)!r} has no {LLM_BACKBONE_DIR}/ and `pretrained_llm` ({config.get('pretrained_llm')!r}) is not "
        "a local directory. Pass llm_path= a local directory with the LLM's config.json and tokenizer "
        "(for canary-qwen-2.5b: Qwen3-1.7B's)."
    )


def load_weights(model: SALM, file: Path) -> None:
    """Load safetensors weights strictly, naming the first offending keys if they do not fit."""
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except RuntimeError as error:
        raise CheckpointError(
            f"weights in {str(file)!r} do not fit this model: {_first_lines(error)}"
        ) from error
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {str(file)!r} do not match the model's architecture: "
            f"{len(missing)} missing (first: {sorted(missing)[:5]}), "
            f"{len(unexpected)} unexpected (first: {sorted(unexpected)[:5]})"
        )


def _first_lines(error: Exception, count: int = 6) -> str:
    return " ".join(str(error).splitlines()[:count])
