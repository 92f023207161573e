"""The Conformer convolution module's depthwise convolution as a sum of shifted, scaled frames.

Why: NeMo's ``ConformerConvolution`` runs its depthwise ``Conv1d`` (kernel 9 in the canary shape, one
filter per channel) through cuDNN. Inside a compiled Conformer layer that is the one op Inductor
cannot fuse: the GLU before it and the norm and Swish after it each make a round trip through
memory around cuDNN's kernel, its backward goes to ATen (``salm.model.compile``), and every new
frame count costs cuDNN a new plan on the host (BENCHMARKS.md, "What a new frame count costs").
Written as ``K`` shifted multiply-adds over the zero-padded frames, the same computation is plain
pointwise arithmetic, which Inductor fuses with its neighbours and generates for any frame count.

``salm.model.compile.compile_layers`` turns them on for every layer it compiles (training's
``trainer.compile_layers`` and a Serve replica's compiled encoder) and ``uncompile_layers`` back
off: run eagerly they would be ``K`` kernels over the whole tensor instead of cuDNN's one. Measured
on the training step with a new frame count at every step: -2.9% per pass on an H200, -1.2% and
-1.5% on an H100, 0.8 GB less memory (BENCHMARKS.md, "One H100, 2026-12-05"); the serving encoder
not yet. Same module, weights and state-dict keys; the numbers are the convolution's up to
summation order. Under autocast the sum runs in fp32 and comes out in the autocast dtype, as the
convolution's does; a float64 model sums in float64.
"""

from __future__ import annotations

import torch
from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D
from torch import nn


class DepthwiseConvAsShiftedSums(CausalConv1D):
    """NeMo's depthwise ``CausalConv1D`` (stride 1, no dilation) computed as ``sum_k w[:, k] * x[:, :, t + k]``.

    A streaming call (``cache`` given) runs NeMo's convolution unchanged.
    """

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):  # [B, C, T] -> [B, C, T']
        if cache is not None:
            return super().forward(x, cache=cache)
        out_dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        )
        exact = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 sum in fp32; fp64 stays fp64
        padded = nn.functional.pad(x, (self._left_padding, self._right_padding)).to(exact)
        weight = self.weight.to(exact)[:, 0, :].unsqueeze(-1)  # [C, K, 1]
        kernel = self.kernel_size[0]
        frames = padded.shape[-1] - kernel + 1
        out = padded[..., :frames] * weight[:, 0]
        for k in range(1, kernel):
            out = out + padded[..., k : k + frames] * weight[:, k]
        if self.bias is not None:
            out = out + self.bias.to(exact).unsqueeze(-1)
        return out.to(out_dtype)


def is_depthwise(conv: nn.Module) -> bool:
    """Whether ``conv`` is a stride-1, undilated ``CausalConv1D`` with one filter per channel."""
    return (
        isinstance(conv, CausalConv1D)
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.stride == (1,)
        and conv.dilation == (1,)
        and conv.padding_mode == "zeros"
    )


def use_shifted_sum_depthwise_convs(module: nn.Module, enabled: bool = True) -> int:
    """Turn the depthwise convolution of every Conformer convolution module in ``module`` (an encoder or
    one of its layers) into shifted sums, or back to NeMo's ``CausalConv1D`` with ``enabled=False``;
    returns how many modules changed class."""
    from nemo.collections.asr.parts.submodules.conformer_modules import ConformerConvolution

    wanted = DepthwiseConvAsShiftedSums if enabled else CausalConv1D
    changed = 0
    for child in module.modules():
        if isinstance(child, ConformerConvolution):
            conv = child.depthwise_conv
            ours_or_nemos = type(conv) in (CausalConv1D, DepthwiseConvAsShiftedSums)
            if ours_or_nemos and is_depthwise(conv) and type(conv) is not wanted:
                conv.__class__ = wanted
                changed += 1
    return changed
