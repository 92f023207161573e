"""A tiny NeMo ASR ``.nemo`` in NeMo's own format, built offline for tests.

NeMo's ``SaveRestoreConnector`` writes an uncompressed tar of a directory added as ``.``:
``model_config.yaml`` (the whole model config) and ``model_weights.ckpt`` (``torch.save`` of the
state dict). A CTC decoder is included so tests can check that only the preprocessor and encoder
are taken.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from salm.model.perception import build_from_target

TINY_RECIPE = Path(__file__).resolve().parents[1] / "salm" / "configs" / "tiny.yaml"


def write_tiny_asr_nemo(path: Path, seed: int = 1, d_model: int = 64) -> Path:
    """Write a NeMo-format ASR ``.nemo`` whose encoder has the tiny recipe's shape (``d_model`` aside)."""
    perception = OmegaConf.load(TINY_RECIPE).model.perception
    encoder_cfg = OmegaConf.merge(perception.encoder, {"d_model": d_model, "n_layers": 1})
    torch.manual_seed(seed)
    preprocessor = build_from_target("preprocessor", perception.preprocessor)
    encoder = build_from_target("encoder", encoder_cfg)
    decoder = torch.nn.Conv1d(d_model, 33, kernel_size=1)
    state_dict = {
        **{f"preprocessor.{k}": v for k, v in preprocessor.state_dict().items()},
        **{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
        **{f"decoder.decoder_layers.0.{k}": v for k, v in decoder.state_dict().items()},
    }
    config = {
        "sample_rate": 16000,
        "preprocessor": OmegaConf.to_container(perception.preprocessor),
        "encoder": OmegaConf.to_container(encoder_cfg),
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": d_model,
            "num_classes": 32,
        },
    }
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        (staging / "model_config.yaml").write_text(OmegaConf.to_yaml(config))
        torch.save(state_dict, staging / "model_weights.ckpt")
        with tarfile.open(path, "w:") as tar:
            tar.add(staging, arcname=".")
    return path
