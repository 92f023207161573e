"""The subsampling's stem and pointwise Conv2d as matmuls (``salm.model.subsampling_convs``): same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from nemo.collections.asr.modules import ConformerEncoder

from salm.model.subsampling_convs import (
    PointwiseConv2dAsMatmul,
    StemConvAsMatmul,
    is_one_channel_stem,
    is_pointwise_conv2d,
    use_matmul_subsampling_convs,
)


def conformer_encoder(subsampling: str = "dw_striding") -> ConformerEncoder:
    torch.manual_seed(0)
    encoder = ConformerEncoder(
        feat_in=16, n_layers=1, d_model=32, n_heads=4, subsampling=subsampling, subsampling_factor=8,
        subsampling_conv_channels=8,
    )  # fmt: skip
    return encoder.double().eval()


def outputs_and_gradients(encoder: ConformerEncoder, features: torch.Tensor, lengths: torch.Tensor):
    encoder.zero_grad()
    encoded, encoded_lengths = encoder(audio_signal=features, length=lengths)
    encoded.square().mean().backward()
    return encoded, encoded_lengths, [p.grad for p in encoder.parameters()]


@pytest.mark.parametrize("frames", [203, 256])  # ragged and aligned mel frame counts
def test_matmul_subsampling_gives_nemos_outputs_and_gradients(frames: int) -> None:
    nemo = conformer_encoder()
    ours = copy.deepcopy(nemo)
    keys = list(ours.state_dict())

    assert use_matmul_subsampling_convs(ours) == 3  # the stem and dw_striding's two pointwise convolutions

    assert [type(m) for m in ours.pre_encode.conv if isinstance(m, torch.nn.Conv2d)] == [
        StemConvAsMatmul,
        torch.nn.Conv2d,
        PointwiseConv2dAsMatmul,
        torch.nn.Conv2d,
        PointwiseConv2dAsMatmul,
    ]  # fmt: skip  (the depthwise ones stay convolutions)
    assert list(ours.state_dict()) == keys  # NeMo's checkpoints load as they are
    features = torch.randn(3, 16, frames, dtype=torch.float64)
    lengths = torch.tensor([frames, frames - 17, frames // 2])
    nemo_out, nemo_lengths, nemo_grads = outputs_and_gradients(nemo, features, lengths)
    our_out, our_lengths, our_grads = outputs_and_gradients(ours, features, lengths)
    torch.testing.assert_close(our_out, nemo_out)
    assert torch.equal(our_lengths, nemo_lengths)
    for mine, reference in zip(our_grads, nemo_grads, strict=True):
        torch.testing.assert_close(mine, reference)


@pytest.mark.parametrize(
    ("conv", "cls", "channels"),
    [
        (torch.nn.Conv2d(8, 6, 1), PointwiseConv2dAsMatmul, 8),
        (torch.nn.Conv2d(1, 6, 3, 2, 1), StemConvAsMatmul, 1),
    ],
)
def test_a_channels_last_input_gives_a_channels_last_output_and_the_same_numbers(conv, cls, channels) -> None:
    """As the convolutions do: encoder_layout's channels-last option must reach every later convolution."""
    conv = conv.double()
    matmul = copy.deepcopy(conv)
    matmul.__class__ = cls
    for channels_last in (False, True):
        x = torch.randn(2, channels, 9, 7, dtype=torch.float64)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        out = matmul(x)
        torch.testing.assert_close(out, conv(x))
        assert (out.stride(1) == 1) is channels_last


def test_switching_back_restores_nemos_convolutions_and_other_subsamplings_are_left_alone() -> None:
    encoder = conformer_encoder()
    use_matmul_subsampling_convs(encoder)
    assert use_matmul_subsampling_convs(encoder, stem=False) == 2  # the pointwise ones only
    assert type(encoder.pre_encode.conv[0]) is torch.nn.Conv2d
    assert use_matmul_subsampling_convs(encoder, enabled=False) == 0
    assert all(type(m) is torch.nn.Conv2d for m in encoder.pre_encode.conv if isinstance(m, torch.nn.Conv2d))

    striding = conformer_encoder(
        "striding"
    )  # every Conv2d has 3x3 kernels: only the one-channel stem changes
    assert use_matmul_subsampling_convs(striding) == 1
    assert type(striding.pre_encode.conv[0]) is StemConvAsMatmul
    assert use_matmul_subsampling_convs(conformer_encoder("dw_striding_conv1d")) == 0  # Conv1d: not ours

    assert not is_pointwise_conv2d(torch.nn.Conv2d(8, 8, 1, groups=2))
    assert not is_pointwise_conv2d(torch.nn.Conv2d(8, 8, 1, stride=2))
    assert is_pointwise_conv2d(torch.nn.Conv2d(8, 16, 1))
    assert is_one_channel_stem(torch.nn.Conv2d(1, 16, 3, stride=2, padding=1))
    assert not is_one_channel_stem(torch.nn.Conv2d(2, 16, 3))
    assert not is_one_channel_stem(torch.nn.Conv2d(1, 16, 3, padding="same"))


def test_the_salm_encoder_runs_its_subsampling_stem_and_pointwise_convolutions_as_matmuls(tiny_salm) -> None:
    convs = [m for m in tiny_salm.perception.encoder.pre_encode.conv if isinstance(m, torch.nn.Conv2d)]
    assert [type(m) for m in convs] == [
        StemConvAsMatmul, torch.nn.Conv2d, PointwiseConv2dAsMatmul, torch.nn.Conv2d, PointwiseConv2dAsMatmul,
    ]  # fmt: skip
