"""One entry point for every kind of saved SALM: ``load_pretrained(path)``.

What ``path`` may be, and how it is recognised:

- a ``.nemo`` file (any tar): ``salm.io.nemo_file``;
- a Ray Train checkpoint directory: ``<ckpt>/model/config.json`` (its consolidated HF-layout
  weights; the DeepSpeed state next to it is only for resuming training);
- an HF-layout directory: ``config.json`` + ``model.safetensors`` (ours, or the published
  canary-qwen-2.5b one given ``llm_path``);
- a Lightning ``.ckpt`` written by NeMo's SALM training: its ``state_dict`` and
  ``hyper_parameters["cfg"]``, read with ``torch.load(weights_only=True)``.

Anything else gets an error that says what was expected.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from salm.errors import CheckpointError
from salm.io.hf_layout import CONFIG_FILE, load_hf_layout
from salm.io.nemo_file import load_nemo, load_state_dict_checked, load_torch_file
from salm.model.salm import SALM

RAY_MODEL_DIR = "model"
LIGHTNING_SUFFIXES = (".ckpt", ".pt", ".pth")
EXPECTED = (
    "a .nemo file, a NeMo Lightning .ckpt, a Ray Train checkpoint directory (with model/config.json) "
    "or an HF-layout directory (config.json + model.safetensors)"
)


def load_pretrained(
    path: str | Path,
    llm_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    *,
    asr_path: str | Path | None = None,
) -> SALM:
    """Load a SALM from any supported file or directory (see the module docstring).

    ``llm_path``: a local LLM config + tokenizer directory, for files that do not carry one (the
    published canary-qwen-2.5b, NeMo ``.ckpt`` files). ``tokenizer_path``: a tokenizer directory
    overriding the bundled one. ``asr_path``: the ASR ``.nemo`` a NeMo run started from, needed
    only when the run's config takes its encoder config from that model.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix in LIGHTNING_SUFFIXES:
            return load_lightning_checkpoint(path, llm_path, tokenizer_path, asr_path=asr_path)
        if path.suffix == ".nemo" or tarfile.is_tarfile(path):
            return load_nemo(path, tokenizer_path=tokenizer_path)
        raise CheckpointError(f"{str(path)!r} is not a model file SALM can load; expected {EXPECTED}")
    if path.is_dir():
        if (path / RAY_MODEL_DIR / CONFIG_FILE).exists():
            return load_hf_layout(path / RAY_MODEL_DIR, llm_path=llm_path, tokenizer_path=tokenizer_path)
        if (path / CONFIG_FILE).exists():
            return load_hf_layout(path, llm_path=llm_path, tokenizer_path=tokenizer_path)
        if (path / ".metadata").exists():
            raise CheckpointError(
                f"{str(path)!r} is a torch distributed checkpoint (NeMo's FSDP2/TP training); convert it "
                "to an HF directory with NeMo's `examples/speechlm2/to_hf.py` first, then load that"
            )
        if (path / "deepspeed").is_dir() or (path / "train_state.json").exists():
            raise CheckpointError(
                f"{str(path)!r} looks like a Ray Train checkpoint but has no {RAY_MODEL_DIR}/{CONFIG_FILE}: "
                "the consolidated weights were not written (interrupted save?); use an earlier checkpoint"
            )
        raise CheckpointError(f"{str(path)!r} is not a SALM model directory: {CONFIG_FILE} is missing")
    if path.suffix in (".nemo", *LIGHTNING_SUFFIXES):
        raise CheckpointError(f"model file {str(path)!r} does not exist")
    raise CheckpointError(
        f"{str(path)!r} is not a SALM model directory: {CONFIG_FILE} is missing (the path does not exist); "
        f"expected {EXPECTED}"
    )


def load_lightning_checkpoint(
    path: Path,
    llm_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    *,
    asr_path: str | Path | None = None,
) -> SALM:
    """A checkpoint from NeMo's ``speechlm2`` SALM recipe (Lightning): weights + the run's model config.

    NeMo saves the config it was *given*: when the encoder came from ``pretrained_asr``, the
    preprocessor/encoder configs are not in it and are read from the ASR ``.nemo`` (config only).
    """
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} has no `state_dict`: it is not a Lightning checkpoint")
    cfg = (checkpoint.get("hyper_parameters") or {}).get("cfg")
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{str(path)!r} has no `hyper_parameters['cfg']`; it was not written by NeMo's SALM "
            "(which saves its model config there), so its architecture is unknown"
        )
    config = OmegaConf.create(cfg)
    # NeMo built the encoder from `pretrained_asr` when the run loaded pretrained weights.
    encoder_from_asr = bool(config.get("pretrained_asr")) and bool(config.get("pretrained_weights", True))
    config.pretrained_weights = False  # every weight comes from the checkpoint
    config.pretrained_llm = str(_local_dir(llm_path or config.get("pretrained_llm"), "llm_path", path))
    if tokenizer_path is not None:
        config.tokenizer_path = str(tokenizer_path)
    elif config.get("tokenizer_path") and not Path(str(config.tokenizer_path)).is_dir():
        config.tokenizer_path = None
    if encoder_from_asr:
        config.perception = _perception_from_asr(config, asr_path, path)
    model = SALM(config)
    load_state_dict_checked(model, checkpoint["state_dict"], str(path))
    return model


def _perception_from_asr(config: DictConfig, asr_path: str | Path | None, source: Path) -> DictConfig:
    from salm.io.nemo_asr import perception_config_from_asr

    asr = asr_path or config.pretrained_asr
    if Path(str(asr)).is_file():
        return perception_config_from_asr(asr, config.perception)
    perception = config.perception
    if perception.get("preprocessor") is not None and (perception.get("encoder") or {}).get("_target_"):
        return perception  # complete already; the state-dict check catches a different encoder
    raise CheckpointError(
        f"the config in {str(source)!r} takes its preprocessor/encoder config from `pretrained_asr` "
        f"({config.pretrained_asr!r}), which is not a local file; pass asr_path= the ASR .nemo the run "
        "started from (only its config is read)"
    )


def _local_dir(value: str | Path | None, argument: str, source: Path) -> Path:
    if value is not None and (Path(str(value)) / CONFIG_FILE).exists():
        return Path(str(value))
    raise CheckpointError(
        f"{str(source)!r} needs the LLM's config and tokenizer, and `pretrained_llm` ({value!r}) is not a "
        f"local directory with {CONFIG_FILE}. Pass {argument}= a local directory (for canary-qwen-2.5b: Qwen3-1.7B's)."
    )
