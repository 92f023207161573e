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

The view's offset comes from slicing a flat view, not from ``storage_offset()``: Dynamo cannot
trace that int, and the graph break split every compiled Conformer layer into 4 graphs and 7 frames.
One graph per layer measured 1.4% faster per training pass on one H200 engine (BENCHMARKS.md).

``perception.pad_attention_keys_to`` (``pad_keys``, on in the canary recipe) pads the keys to a
multiple of 8 so that every score matrix is 16-byte aligned for cuBLAS: 5% faster per training pass
with the break-free view (same engine, BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention
from torch import nn

from salm.errors import SALMConfigError


def strided_rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, P)`` position scores, ``P >= 2T - 1`` -> ``(B, H, T, P - T + 1)`` aligned with the
    keys (a view): NeMo's ``rel_shift`` on those columns."""
    batch, heads, time, positions = scores.shape
    if positions < 2 * time - 1:
        raise ValueError(
            f"position scores {tuple(scores.shape)}: need at least 2T - 1 = {2 * time - 1} columns"
        )
    return (
        scores.contiguous()
        .view(-1)[time - 1 :]  # the offset, traceable (storage_offset() would break the graph)
        .as_strided(
            (batch, heads, time, positions - time + 1),
            (heads * time * positions, time * positions, positions - 1, 1),
        )
    )


def pad_keys(
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    pos_emb: torch.Tensor,
    queries: int,
    multiple: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values padded to a multiple of ``multiple`` frames, masked; the position table to 2x that.

    Why: with ``T`` frames the attention's score matrices are ``T`` wide, and for an odd ``T`` (every
    bucket of the training benchmark) cuBLAS can only run its unaligned SM75 kernels on them
    (``cutlass_75_..._align1``, ~10% of the canary step's GPU time). With ``multiple`` keys (8 for
    bf16: 16 bytes) every score matrix and its gradient is aligned; the queries keep ``T`` rows. The
    padded keys are masked, so their softmax weight is exactly 0 and the outputs are those of ``T``
    keys. The position table grows from ``2T - 1`` rows to ``2 x keys`` (zero rows): the shift reads
    rows past ``2T - 2`` only for padded keys.
    """
    time = key.shape[1]
    keys = (time + multiple - 1) // multiple * multiple
    key = nn.functional.pad(key, (0, 0, 0, keys - time))
    value = nn.functional.pad(value, (0, 0, 0, keys - time))
    if mask is None:  # NeMo's "attend everywhere"
        mask = torch.zeros(1, queries, time, dtype=torch.bool, device=key.device)
    # Each pad is written against the tensor's own length, so that every padded width is `keys` or
    # `2 x keys` in Dynamo's symbols: "mask's T + keys - key's T" broke Inductor's stride reasoning in
    # a recompile (torch 2.13, a batch of one clip with dropout).
    mask = nn.functional.pad(mask, (0, keys - mask.shape[-1]), value=True)
    pos_emb = nn.functional.pad(pos_emb, (0, 0, 0, 2 * keys - pos_emb.shape[1]))
    return key, value, mask, pos_emb


class StridedRelPositionAttention(RelPositionMultiHeadAttention):
    """NeMo's relative-position attention with ``strided_rel_shift``; optionally keys padded to
    aligned widths (``key_multiple``)."""

    key_multiple = 0  # pad_keys to this multiple (set_key_padding); 0: NeMo's T keys

    def forward(self, query, key, value, mask, pos_emb, cache=None):
        if self.key_multiple and cache is None and pos_emb.shape[1] == 2 * key.shape[1] - 1:
            key, value, mask, pos_emb = pad_keys(key, value, mask, pos_emb, query.shape[1], self.key_multiple)
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


def set_key_padding(encoder: nn.Module, multiple: int | None) -> None:
    """``perception.pad_attention_keys_to``: pad every strided-shift attention's keys to ``multiple``.

    None or 0: NeMo's ``T`` keys. Same outputs either way (``pad_keys`` masks the padding).
    """
    if multiple is None:
        multiple = 0
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 0:
        raise SALMConfigError(
            "`model.perception.pad_attention_keys_to` must be a whole number >= 0 (8: 16-byte aligned "
            f"bf16 attention matmuls; 0: NeMo's T keys), got {multiple!r}"
        )
    for module in encoder.modules():
        if isinstance(module, StridedRelPositionAttention):
            module.key_multiple = multiple
