"""The ``dw_striding`` subsampling's cuDNN convolutions as matmuls (same weights, same numbers).

Why: NeMo's ``dw_striding`` subsampling is a 3x3 stride-2 ``Conv2d`` from the one mel channel (the
stem), then two (depthwise 3x3 stride-2, pointwise 1x1) ``Conv2d`` pairs. In bf16 NCHW, PyTorch
runs the depthwise ones on its own kernel but hands the stem and the pointwise ones to cuDNN, which
sets up its kernels for every new input shape (forward, and in training the data and weight
gradients). Bucketed batches bring a new frame count at nearly every step. Both are plain matrix
products in disguise:

- a pointwise ``Conv2d`` over ``[B, C, H, W]`` is ``W[C_out, C_in] @ x[B, C_in, H*W]`` (a batched
  GEMM on the NCHW tensor as it lies, no copy);
- the stem, with one input channel, is ``W[C_out, 9] @ unfold(x)[B, 9, H'*W']`` (im2col).

cuBLAS needs no per-shape set-up. Only ``forward`` changes; the module, its weights
(``[out, in, kh, kw]``) and its state-dict keys stay NeMo's.
"""

from __future__ import annotations

import torch
from torch import nn


def _add_channel_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias.view(1, -1, 1)


class PointwiseConv2dAsMatmul(nn.Conv2d):
    """A 1x1, stride-1, ungrouped ``Conv2d`` computed as one batched matmul on the NCHW input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H, W]
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # channels-last input (the encoder_layout option): a linear over its [B, H, W, C] view
            out = nn.functional.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
            return out.permute(0, 3, 1, 2)
        batch, _, height, width = x.shape
        out = torch.matmul(self.weight.flatten(1), x.flatten(2))  # [B, C_out, H*W]
        return _add_channel_bias(out, self.bias).view(batch, -1, height, width)


class StemConvAsMatmul(nn.Conv2d):
    """A one-input-channel, ungrouped ``Conv2d`` computed as im2col (``unfold``) and one batched matmul.

    A channels-last input (``salm.model.encoder_layout``'s hook restrides the one-channel mel so)
    gives a channels-last output, as the convolution would, so the later convolutions stay so too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, H, W] -> [B, C_out, H', W']
        batch, _, height, width = x.shape
        columns = nn.functional.unfold(
            x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride
        )  # [B, kh*kw, H'*W']
        out_height, out_width = (
            (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1
            for size, pad, dil, kernel, stride in zip(
                (height, width), self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )
        if x.stride(1) == 1 and height * width > 1:  # one channel, restrided channels-last
            out = nn.functional.linear(columns.transpose(1, 2), self.weight.flatten(1), self.bias)
            return out.view(batch, out_height, out_width, -1).permute(0, 3, 1, 2)
        out = _add_channel_bias(torch.matmul(self.weight.flatten(1), columns), self.bias)
        return out.view(batch, -1, out_height, out_width)


def _plain_conv2d(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def is_pointwise_conv2d(conv: nn.Module) -> bool:
    """Whether ``conv`` is a ``Conv2d`` that is exactly a per-pixel matrix product."""
    return (
        _plain_conv2d(conv)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
    )


def is_one_channel_stem(conv: nn.Module) -> bool:
    """Whether ``conv`` is an ungrouped ``Conv2d`` from a single input channel (im2col is cheap)."""
    return _plain_conv2d(conv) and conv.in_channels == 1


def use_matmul_subsampling_convs(encoder: nn.Module, enabled: bool = True, stem: bool = True) -> int:
    """Run the encoder's Conv2d subsampling's stem and pointwise convolutions as matmuls (or as
    ``nn.Conv2d`` again with ``enabled=False``; ``stem=False`` leaves the stem a convolution);
    returns how many convolutions are matmuls now.

    Only the plain ``nn.Conv2d`` of ``encoder.pre_encode.conv`` change class (NeMo's ``dw_striding``
    and ``striding`` stems, ``dw_striding``'s pointwise convolutions); depthwise, causal and
    Conv1d subsamplings are left alone.
    """
    pre_encode = getattr(encoder, "pre_encode", None)
    layers = getattr(pre_encode, "conv", None)
    if not isinstance(layers, nn.Sequential):
        return 0
    as_matmul = 0
    for conv in layers:
        if type(conv) not in (nn.Conv2d, PointwiseConv2dAsMatmul, StemConvAsMatmul):
            continue
        conv.__class__ = nn.Conv2d
        if enabled and is_pointwise_conv2d(conv):
            conv.__class__ = PointwiseConv2dAsMatmul
        elif enabled and stem and is_one_channel_stem(conv):
            conv.__class__ = StemConvAsMatmul
        as_matmul += type(conv) is not nn.Conv2d
    return as_matmul
