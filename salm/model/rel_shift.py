"""The Conformer's relative-position shift as a strided view: same numbers, no padded copy.

NeMo's ``RelPositionMultiHeadAttention.rel_shift`` aligns the position scores ``(B, H, T, 2T-1)``
with the keys by Transformer-XL's trick: pad a zero column, view the buffer as ``(2T, T)``, drop a
row, view back. In eager PyTorch that is one padded copy. Compiled with dynamic shapes (our
``trainer.compile_layers``), the fused kernels that read through the padded view and write its
gradient were the two most expensive kernels of a training step at canary-qwen-2.5b shapes
(``bench/train_throughput.py --profile``: ~0.9 ms per call, ~20% of the GPU's time; 19 ms per
pass instead of 282 with this view, BENCHMARKS.md).

The shift is a plain strided view: ``shifted[..., i, j] = scores[..., i, j + T - 1 - i]`` for ``T``
queries and ``P`` position columns, i.e. row stride ``P - 1`` and offset ``T - 1`` into the
contiguous scores. That is NeMo's result on its first ``P - T + 1`` columns, the ones valid in every
row (``T`` keys without a cache, more with a streaming cache); both of NeMo's attention paths slice
the shifted scores to the key length anyway.

With ``pad_position_table`` (set by ``perception.pad_frames_to``), ``StridedRelPositionAttention``
gives the position table one unused row (``2T`` rows, not ``2T - 1``): the position scores are then
8-aligned when ``T`` is a multiple of 4. The extra column is never read: the view stops at column
``2T - 2``.
"""

from __future__ import annotations

import torch
from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention
from torch import nn


def strided_rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, P)`` position scores, ``P >= 2T - 1`` -> ``(B, H, T, P - T + 1)`` aligned with the
    keys (a view): NeMo's ``rel_shift`` on those columns."""
    batch, heads, time, positions = scores.shape
    if positions < 2 * time - 1:
        raise ValueError(
            f"position scores {tuple(scores.shape)}: need at least 2T - 1 = {2 * time - 1} columns"
        )
    scores = scores.contiguous()
    return scores.as_strided(
        (batch, heads, time, positions - time + 1),
        (heads * time * positions, time * positions, positions - 1, 1),
        # An int Dynamo cannot trace: a graph break in each compiled Conformer layer. The break-free
        # form (offset by slicing a flat view) measured level end to end so far (BENCHMARKS.md).
        scores.storage_offset() + time - 1,
    )


class StridedRelPositionAttention(RelPositionMultiHeadAttention):
    """NeMo's relative-position attention with ``strided_rel_shift`` (and optionally a 2T-row position table)."""

    pad_position_table = False  # salm.model.encoder_layout.set_frame_padding

    def forward(self, query, key, value, mask, pos_emb, cache=None):
        if self.pad_position_table and cache is None and pos_emb.shape[1] == 2 * query.shape[1] - 1:
            pos_emb = nn.functional.pad(pos_emb, (0, 0, 0, 1))  # one unused row: 2T-wide position scores
        return super().forward(query, key, value, mask, pos_emb, cache)

    def rel_shift(self, x: torch.Tensor) -> torch.Tensor:
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
