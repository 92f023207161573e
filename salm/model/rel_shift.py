"""The Conformer's relative-position shift as a strided view: same numbers, no padded copy.

NeMo's ``RelPositionMultiHeadAttention.rel_shift`` aligns the position scores ``(B, H, T, 2T-1)``
with the keys by Transformer-XL's trick: pad a zero column, view the buffer as ``(2T, T)``, drop a
row, view back. In eager PyTorch that is one padded copy. Compiled with dynamic shapes (our
``trainer.compile_layers``), the fused kernels that read through the padded view and write its
gradient were the two most expensive kernels of a training step at canary-qwen-2.5b shapes
(``bench/train_throughput.py --profile``: ~0.9 ms per call, ~20% of the GPU's time; 19 ms per
pass instead of 282 with this view, BENCHMARKS.md).

The shift is a plain strided view: ``shifted[..., i, j] = scores[..., i, j + T - 1 - i]``, i.e.
row stride ``2T - 2`` and offset ``T - 1`` into the contiguous scores. Only the ``T`` key columns
are returned: both of NeMo's attention paths slice the shifted scores to the key length anyway.
"""

from __future__ import annotations

import torch
from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention
from torch import nn


def strided_rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, 2T-1)`` position scores -> ``(B, H, T, T)`` aligned with the keys (a view)."""
    batch, heads, time, positions = scores.shape
    scores = scores.contiguous()
    return scores.as_strided(
        (batch, heads, time, time),
        (heads * time * positions, time * positions, positions - 1, 1),
        scores.storage_offset() + time - 1,
    )


class StridedRelPositionAttention(RelPositionMultiHeadAttention):
    """NeMo's relative-position attention with ``strided_rel_shift``."""

    def rel_shift(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 2 * x.shape[-2] - 1:  # queries and keys differ (a streaming cache)
            return super().rel_shift(x)
        return strided_rel_shift(x)


def use_strided_rel_shift(encoder: nn.Module) -> int:
    """Give every relative-position attention of ``encoder`` the strided shift; returns how many.

    Each NeMo ``RelPositionMultiHeadAttention`` (not its Longformer subclass, which shifts chunks
    its own way) becomes a ``StridedRelPositionAttention``: same module, weights and state-dict
    keys, only ``rel_shift`` differs.
    """
    patched = 0
    for module in encoder.modules():
        if type(module) is RelPositionMultiHeadAttention:
            module.__class__ = StridedRelPositionAttention
            patched += 1
    return patched
