"""Per-feature normalisation of the mel features without NeMo's per-batch wait for the GPU."""

from __future__ import annotations

import pytest
import torch

from salm.model.feature_normalization import normalize_per_feature


def nemo_normalized(features: torch.Tensor, lengths: torch.Tensor, pad_value: float) -> torch.Tensor:
    """NeMo's ``normalize_batch`` then its featurizer's padding mask, as ``FilterbankFeatures.forward``
    runs them on a machine without CUDA. Where CUDA is available NeMo refuses a one-frame clip (its
    ``.item()`` check); without, it computes the numbers this reference needs."""
    from unittest import mock

    from nemo.collections.asr.parts.preprocessing.features import normalize_batch

    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        normalized, _, _ = normalize_batch(features, lengths, normalize_type="per_feature")
    past_end = torch.arange(features.shape[2]).unsqueeze(0) >= lengths.unsqueeze(1)
    return normalized.masked_fill(past_end.unsqueeze(1), pad_value)


@pytest.mark.parametrize("pad_value", [0.0, -3.5])
def test_normalize_per_feature_gives_nemos_numbers_for_every_length_including_one_frame(
    pad_value: float,
) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(5, 8, 37, generator=generator) * 3 + 2
    lengths = torch.tensor([37, 20, 2, 1, 40])  # the last longer than the frames there are: NeMo counts 37
    expected = nemo_normalized(features, lengths, pad_value)
    # by the time ours runs, NeMo's featurizer has already masked the frames past each length
    past_end = torch.arange(37).unsqueeze(0) >= lengths.unsqueeze(1)
    masked = features.masked_fill(past_end.unsqueeze(1), pad_value)
    ours = normalize_per_feature(masked, lengths, pad_value)
    assert torch.equal(ours, expected)
    assert torch.isfinite(ours).all()  # one frame: NeMo's 0/0 standard deviation handled as NeMo does
    assert (ours[3, :, 1:] == pad_value).all() and (ours[3, :, 0] == 0).all()


def test_perception_normalizes_itself_and_never_calls_nemos_normalize_batch(tiny_salm, monkeypatch) -> None:
    """The model's mel features equal those of NeMo's own preprocessor built from the same config,
    while NeMo's ``normalize_batch`` (whose ``.item()`` waits for the GPU) is never called."""
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor
    from nemo.collections.asr.parts.preprocessing import features as nemo_features
    from omegaconf import OmegaConf

    perception = tiny_salm.perception
    assert perception.normalizes_per_feature
    assert tiny_salm.cfg.perception.preprocessor.normalize == "per_feature"  # the saved config keeps it
    preprocessor_cfg = OmegaConf.to_container(tiny_salm.cfg.perception.preprocessor)
    preprocessor_cfg.pop("_target_")
    nemo_preprocessor = AudioToMelSpectrogramPreprocessor(**preprocessor_cfg).eval()
    audio = torch.randn(3, 16000, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([16000, 9000, 4000])
    expected, expected_lens = nemo_preprocessor(input_signal=audio, length=lengths)

    def no_nemo_normalization(*args, **kwargs):
        raise AssertionError("NeMo's normalize_batch ran: it syncs with the GPU on every batch")

    monkeypatch.setattr(nemo_features, "normalize_batch", no_nemo_normalization)
    features, feature_lens = perception.mel_features(audio, lengths)
    assert torch.equal(feature_lens, expected_lens)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    embeddings, _ = perception(audio, lengths)  # the encoder's path goes through the same features
    assert torch.isfinite(embeddings).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NeMo's check waits only where CUDA is available")
def test_mel_features_on_the_gpu_never_wait_for_it(tiny_salm) -> None:
    """With NeMo's ``normalize_batch`` the front end made one blocking ``.item()`` per batch on a GPU;
    torch's sync debug mode turns any such wait into an error."""
    import copy

    perception = copy.deepcopy(tiny_salm.perception).cuda()
    audio = torch.randn(3, 16000, device="cuda")
    lengths = torch.tensor([16000, 9000, 4000]).cuda()
    perception.mel_features(audio, lengths)  # first call: cuFFT plans and the like
    torch.cuda.synchronize()
    from nemo.collections.asr.parts.preprocessing.features import normalize_batch

    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):  # the wait this test would catch
            normalize_batch(torch.randn(3, 8, 20, device="cuda"), lengths // 800, "per_feature")
        features, _ = perception.mel_features(audio, lengths)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(features).all()
