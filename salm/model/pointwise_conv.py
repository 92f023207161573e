"""The Conformer convolution module's pointwise (kernel-1) convolutions as matmuls over ``[B, T, C]``.

Why: NeMo's ``ConformerConvolution`` runs its two pointwise ``Conv1d`` (``d -> 2d`` before the GLU,
``d -> d`` after the depthwise convolution) on ``[B, C, T]``. cuDNN computes each as a GEMM whose
rows are ``T`` frames long, and for a ``T`` that is not a multiple of 8 (four of the five 640 s
buckets of ``bench/train_throughput.py``: ``T`` = 125, 250, 373, 469) it can only pick its unaligned
SM75/SM80 CUTLASS kernels (``cutlass_75_tensorop_bf16_s1688gemm_*_align1``): on one H200 they were
the only unaligned GEMMs left in a Conformer layer's forward and backward (BENCHMARKS.md, "Dropout
masks by PyTorch's kernel; pointwise convolutions as matmuls"). The same product over ``[B, T, C]`` rows has ``C`` (1024 or
2048) as its leading dimension, always aligned, and cuBLAS runs its Hopper kernels.

Same module, weights (``[out, in, 1]``) and state-dict keys; only ``forward`` differs, and the
numbers are those of the convolution up to the GEMM's summation order.
"""

from __future__ import annotations

import torch
from torch import nn


class PointwiseConvAsMatmul(nn.Conv1d):
    """A kernel-1, stride-1, ungrouped ``Conv1d`` computed as ``linear`` over the transposed input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, T] -> [B, C_out, T]
        return nn.functional.linear(x.transpose(1, 2), self.weight.squeeze(-1), self.bias).transpose(1, 2)


def is_pointwise(conv: nn.Module) -> bool:
    """Whether ``conv`` is a ``Conv1d`` that is exactly a per-frame matrix product."""
    return (
        isinstance(conv, nn.Conv1d)
        and conv.kernel_size == (1,)
        and conv.stride == (1,)
        and conv.dilation == (1,)
        and conv.groups == 1
        and conv.padding in ((0,), "valid")
    )


def use_matmul_pointwise_convs(encoder: nn.Module) -> int:
    """Turn the pointwise convolutions of every Conformer convolution module into matmuls; returns how many.

    Only ``pointwise_conv1`` / ``pointwise_conv2`` of NeMo's ``ConformerConvolution`` that are
    plain kernel-1 ``Conv1d`` change class; anything else (a causal or grouped variant) is left alone.
    """
    from nemo.collections.asr.parts.submodules.conformer_modules import ConformerConvolution

    changed = 0
    for module in encoder.modules():
        if isinstance(module, ConformerConvolution):
            for name in ("pointwise_conv1", "pointwise_conv2"):
                conv = getattr(module, name, None)
                if type(conv) is nn.Conv1d and is_pointwise(conv):
                    conv.__class__ = PointwiseConvAsMatmul
                    changed += 1
    return changed
