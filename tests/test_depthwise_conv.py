"""The Conformer's depthwise convolution as shifted sums (``salm.model.depthwise_conv``) computes NeMo's
convolution: same outputs and gradients, same weights, any padding NeMo allows; streaming calls untouched."""

import copy

import pytest
import torch
from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D

from salm.model.depthwise_conv import DepthwiseConvAsShiftedSums, use_shifted_sum_depthwise_convs


def _depthwise(channels: int, kernel: int, padding) -> CausalConv1D:
    torch.manual_seed(0)
    return CausalConv1D(channels, channels, kernel, stride=1, padding=padding, groups=channels, bias=True)


def _as_shifted_sums(conv: CausalConv1D) -> CausalConv1D:
    shifted = copy.deepcopy(conv)
    shifted.__class__ = DepthwiseConvAsShiftedSums
    return shifted


@pytest.mark.parametrize(
    ("kernel", "padding", "frames"),
    [(9, 4, 37), (9, [8, 0], 37), (9, [6, 2], 5), (31, 15, 64), (3, 1, 1)],  # symmetric, causal, lookahead
)
def test_shifted_sums_give_the_convolutions_outputs_and_gradients(kernel: int, padding, frames: int) -> None:
    conv = _depthwise(12, kernel, padding)
    shifted = _as_shifted_sums(conv)
    x = torch.randn(3, 12, frames, requires_grad=True)
    x_shifted = x.detach().clone().requires_grad_(True)
    expected, got = conv(x), shifted(x_shifted)
    assert got.shape == expected.shape == (3, 12, frames)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    got.backward(upstream)
    torch.testing.assert_close(x_shifted.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shifted.weight.grad, conv.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shifted.bias.grad, conv.bias.grad, rtol=1e-4, atol=1e-4)


def test_under_autocast_the_output_has_the_convolutions_dtype_and_values() -> None:
    conv = _depthwise(16, 9, 4)
    shifted = _as_shifted_sums(conv)
    x = torch.randn(2, 16, 50).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = conv(x), shifted(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_in_float64_the_sum_stays_float64() -> None:
    """Only half-precision inputs are summed in fp32; a float64 model (the rel-shift tests) keeps its precision."""
    conv = _depthwise(16, 9, 4).double()
    shifted = _as_shifted_sums(conv)
    x = torch.randn(2, 16, 50, dtype=torch.float64)
    expected, got = conv(x), shifted(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected)  # float64's default tolerance: 1e-7


def test_a_streaming_call_with_a_cache_runs_nemos_convolution() -> None:
    conv = _depthwise(8, 9, [8, 0])
    conv.cache_drop_size = 0
    shifted = _as_shifted_sums(conv)
    x, cache = torch.randn(1, 8, 6), torch.randn(1, 8, 8)
    (expected, expected_cache), (got, got_cache) = conv(x, cache=cache), shifted(x, cache=cache)
    assert torch.equal(got, expected) and torch.equal(got_cache, expected_cache)


def test_the_encoder_with_shifted_sums_gives_the_same_outputs_and_state_dict(tiny_salm) -> None:
    encoder = copy.deepcopy(tiny_salm.perception.encoder).train()
    layers = len(encoder.layers)
    torch.manual_seed(1)
    features = torch.randn(2, encoder._feat_in, 120)
    lengths = torch.tensor([120, 77])
    keys = list(encoder.state_dict())

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(2)  # the same dropout masks
        encoder.zero_grad()
        out, out_lens = encoder(audio_signal=features, length=lengths)
        out.square().sum().backward()
        first_conv = encoder.layers[0].conv.depthwise_conv.weight.grad.clone()
        return out.detach(), out_lens, first_conv

    before = run()
    assert use_shifted_sum_depthwise_convs(encoder) == layers
    assert all(type(layer.conv.depthwise_conv) is DepthwiseConvAsShiftedSums for layer in encoder.layers)
    after = run()
    assert list(encoder.state_dict()) == keys
    assert torch.equal(after[1], before[1])
    torch.testing.assert_close(after[0], before[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[2], before[2], rtol=1e-3, atol=1e-3)
    assert use_shifted_sum_depthwise_convs(encoder, enabled=False) == layers
    assert all(type(layer.conv.depthwise_conv) is CausalConv1D for layer in encoder.layers)
