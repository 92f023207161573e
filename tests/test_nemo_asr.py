"""Initialising the perception from a NeMo ASR .nemo (`model.pretrained_asr`), as NeMo's SALM does."""

import pytest
import torch
from omegaconf import OmegaConf
from tiny_asr import write_tiny_asr_nemo

from salm.errors import CheckpointError, SALMConfigError
from salm.io.nemo_asr import load_asr_weights, perception_config_from_asr
from salm.model.perception import AudioPerception


@pytest.fixture(scope="module")
def asr_nemo(tmp_path_factory):
    return write_tiny_asr_nemo(tmp_path_factory.mktemp("asr") / "tiny_asr.nemo", d_model=48)


def _perception_cfg(tiny_model_cfg, **encoder_overrides):
    perception = tiny_model_cfg.perception
    perception.output_dim = 64
    perception.modality_adapter.d_model = 48
    perception.encoder = encoder_overrides
    return perception


def test_encoder_and_preprocessor_configs_come_from_the_asr_model(asr_nemo, tiny_model_cfg) -> None:
    cfg = perception_config_from_asr(asr_nemo, _perception_cfg(tiny_model_cfg))
    assert cfg.encoder.d_model == 48 and cfg.encoder.n_layers == 1
    assert cfg.preprocessor.features == 80
    assert cfg.modality_adapter.d_model == 48  # untouched


def test_user_encoder_keys_override_the_asr_config(asr_nemo, tiny_model_cfg) -> None:
    cfg = perception_config_from_asr(
        asr_nemo, _perception_cfg(tiny_model_cfg, att_context_size=[16, 0], dropout=None)
    )
    assert list(cfg.encoder.att_context_size) == [16, 0]
    assert cfg.encoder.dropout == 0.1  # null means "keep the ASR model's value"


def test_asr_weights_land_in_the_perception_and_the_decoder_is_ignored(asr_nemo, tiny_model_cfg) -> None:
    perception = AudioPerception(perception_config_from_asr(asr_nemo, _perception_cfg(tiny_model_cfg)))
    load_asr_weights(perception, asr_nemo)
    asr_weights = torch.load(_member(asr_nemo, "model_weights.ckpt"), weights_only=True)
    ours = perception.encoder.state_dict()
    assert all(torch.equal(ours[k], asr_weights[f"encoder.{k}"]) for k in ours)


def test_a_different_encoder_shape_names_the_offending_keys(asr_nemo, tiny_model_cfg) -> None:
    perception = AudioPerception(
        OmegaConf.merge(
            perception_config_from_asr(asr_nemo, _perception_cfg(tiny_model_cfg)),
            {"encoder": {"n_layers": 2}},
        )
    )
    with pytest.raises(CheckpointError, match=r"missing \['layers\.1\."):
        load_asr_weights(perception, asr_nemo)


def test_a_hub_name_is_refused_with_a_hint(tiny_model_cfg) -> None:
    with pytest.raises(SALMConfigError, match="not a local file"):
        perception_config_from_asr("nvidia/canary-1b-flash", _perception_cfg(tiny_model_cfg))


def _member(archive, name):
    import io
    import tarfile

    with tarfile.open(archive) as tar:
        return io.BytesIO(tar.extractfile(f"./{name}").read())


def test_the_recipes_encoder_keys_outlive_the_asr_models_encoder(asr_nemo, tiny_model_cfg) -> None:
    """A recipe's ``pad_attention_keys_to`` and ``channels_last_subsampling`` (the canary recipe pads
    keys to 8) must reach the encoder although the ASR model's encoder section replaces the recipe's."""
    from salm.model.encoder_layout import uses_channels_last_subsampling

    perception_cfg = _perception_cfg(tiny_model_cfg)
    perception_cfg.pad_attention_keys_to = 8
    perception_cfg.channels_last_subsampling = True
    cfg = perception_config_from_asr(asr_nemo, perception_cfg)
    encoder = AudioPerception(cfg).encoder
    attentions = [layer.self_attn for layer in encoder.layers]
    assert attentions and all(a.key_multiple == 8 for a in attentions)
    assert uses_channels_last_subsampling(encoder)
