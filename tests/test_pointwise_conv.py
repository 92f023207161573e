"""The Conformer's pointwise convolutions as matmuls (``salm.model.pointwise_conv``): same numbers, other GEMMs."""

from __future__ import annotations

import copy

import pytest
import torch
from nemo.collections.asr.modules import ConformerEncoder
from nemo.collections.asr.parts.submodules.conformer_modules import ConformerConvolution

from salm.model.pointwise_conv import PointwiseConvAsMatmul, is_pointwise, use_matmul_pointwise_convs


def conformer_encoder(layers: int = 2) -> ConformerEncoder:
    torch.manual_seed(0)
    return (
        ConformerEncoder(feat_in=16, n_layers=layers, d_model=32, n_heads=4, subsampling_factor=4)
        .double()
        .eval()
    )


@pytest.mark.parametrize("frames", [37, 40])  # an odd and an aligned frame count
def test_matmul_pointwise_convs_give_nemos_outputs_and_gradients(frames: int) -> None:
    nemo = conformer_encoder()
    ours = copy.deepcopy(nemo)
    keys = list(ours.state_dict())

    assert use_matmul_pointwise_convs(ours) == 2 * 2  # two per convolution module, one module per layer

    assert list(ours.state_dict()) == keys  # NeMo's checkpoints load as they are
    features = torch.randn(3, 16, frames * 4, dtype=torch.float64)
    lengths = torch.tensor([frames * 4, frames * 3, frames * 2])
    results = []
    for model in (nemo, ours):
        model.zero_grad()
        encoded, encoded_lengths = model(audio_signal=features, length=lengths)
        encoded.square().mean().backward()
        results.append((encoded, encoded_lengths, [p.grad for p in model.parameters()]))
    (nemo_out, nemo_lengths, nemo_grads), (our_out, our_lengths, our_grads) = results
    torch.testing.assert_close(our_out, nemo_out)
    assert torch.equal(our_lengths, nemo_lengths)
    for mine, reference in zip(our_grads, nemo_grads, strict=True):
        torch.testing.assert_close(mine, reference)


def test_only_plain_kernel_one_convolutions_change_class() -> None:
    module = ConformerConvolution(d_model=8, kernel_size=9)
    encoder = torch.nn.Module()
    encoder.conv = module
    use_matmul_pointwise_convs(encoder)
    assert type(module.pointwise_conv1) is PointwiseConvAsMatmul
    assert type(module.pointwise_conv2) is PointwiseConvAsMatmul
    assert type(module.depthwise_conv) is not PointwiseConvAsMatmul  # kernel 9: a real convolution
    assert not is_pointwise(torch.nn.Conv1d(8, 8, 1, groups=2))
    assert not is_pointwise(torch.nn.Conv1d(8, 8, 1, stride=2))
    assert is_pointwise(torch.nn.Conv1d(8, 16, 1))


def test_the_salm_encoder_runs_its_pointwise_convolutions_as_matmuls(tiny_salm) -> None:
    modules = [layer.conv for layer in tiny_salm.perception.encoder.layers]
    assert modules and all(
        type(m.pointwise_conv1) is PointwiseConvAsMatmul and type(m.pointwise_conv2) is PointwiseConvAsMatmul
        for m in modules
    )
