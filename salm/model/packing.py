"""Packed LLM sequences for the training loss: the batch's rows laid end to end, without padding.

Why: the loss feeds the LLM a ``(B, T)`` batch left-padded to its longest sequence, and every
padded position costs the Qwen3 layers as much as a real one. In the canary bench's bucketed
batches 15% of the LLM's positions are padding (``bench/batch_padding.py``, BENCHMARKS.md "What
the MFU counts"). Packed, the LLM runs one ``(1, N)`` row of the ``N`` real positions; the
positions restart at 0 for every sequence (RoPE is relative, so the scores are those of the
padded row), and attention stays inside each sequence:

- on a GPU through aten's FlashAttention over cumulative sequence lengths (the kernel behind
  ``torch.nn.attention.varlen``; an aten op, so the compiled layers trace it, C++ wrapper too);
- elsewhere (CPU tests, CPU training) through SDPA with a block-diagonal causal mask, the same
  numbers at ``N x N`` cost, fine for the tiny models that run there.

transformers passes ``cu_seq_lens_q`` / ``max_length_q`` (its FlashAttention keyword names) from
the model call to every attention layer; ``packed_attention`` registers under its own name, for
which transformers builds no attention mask at all (``masking_utils``: a packed ``sdpa`` row would
get a dense ``N x N`` mask and no causal skipping).

Off by default (``trainer.pack_llm_sequences``), on in the canary recipe: its compiled step ran 1.09x
faster per pass on an H200 (BENCHMARKS.md). The GPU tests (``tests/test_packing.py -k gpu``) passed
on an H200 with the aten op on 2026-12-05.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface

from salm.model.llm import attention_implementation

PACKED_ATTENTION = "salm_packed_varlen"  # the attention the packed loss runs (registered below)


@dataclass(frozen=True)
class PackedSequences:
    """One row of every real position of a padded batch, and what attention needs to keep the
    sequences apart."""

    embeds: torch.Tensor  # (1, N, H)
    targets: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N): 0, 1, ... per sequence
    cu_seq_lens: torch.Tensor  # (B + 1,) int32: where each sequence starts in the row, then N
    max_length: int  # the longest sequence: the padded width (rows are padded to the longest)

    def model_kwargs(self) -> dict:
        """Keyword arguments of the LLM's base model call (transformers' FlashAttention names)."""
        return {
            "inputs_embeds": self.embeds,
            "position_ids": self.position_ids,
            "attention_mask": None,
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }


def pack_sequences(
    input_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    target_ids: torch.Tensor,
    real_positions: torch.Tensor | None = None,
) -> PackedSequences:
    """``(B, T, H)`` embeddings, ``(B, T)`` mask and targets of ``SALM.prepare_inputs`` -> one packed row.

    The real positions of each row are contiguous after its left padding, as
    ``replace_placeholders`` makes them; the order is row by row, so the target positions come out
    in the padded batch's order (``predicted_ids`` and ``targets_per_example`` are unchanged). A
    masked slot inside a row (a pad id within the text, which ``replace_placeholders`` keeps but
    masks) is dropped here, so the positions after it are one lower than in the padded batch.
    ``real_positions``: the flat indices of ``attention_mask``'s real positions when known in
    advance (``BatchLayout.real_positions``); found here otherwise.
    """
    real = attention_mask.bool()
    lengths = real.sum(dim=1)
    cu_seq_lens = nn.functional.pad(lengths.cumsum(dim=0), (1, 0)).to(torch.int32)
    # The real positions as flat indices, found once (one wait for the GPU); gathering by integer
    # index, unlike a boolean mask, also keeps the backward (a scatter-add) from waiting again.
    flat_real = real.flatten().nonzero().squeeze(1) if real_positions is None else real_positions  # (N,)
    positions = (real.cumsum(dim=1) - 1).flatten().index_select(0, flat_real)
    return PackedSequences(
        # Gathered along dim 1 of a (1, B*T, H) tensor, the row is a tensor of its own, not a view of
        # an (N, H) gather: as a view, the first Qwen3 layer (which takes it) got a compiled graph of
        # its own, Dynamo guarding on the view's base (the tiny SALM's first compiled step on the CPU:
        # 61.1 s with that graph, 52.6 s without; ``bench/startup_cost.py --compile``).
        embeds=input_embeds.flatten(0, 1).unsqueeze(0).index_select(1, flat_real),
        targets=target_ids.flatten().index_select(0, flat_real).unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        cu_seq_lens=cu_seq_lens,
        max_length=attention_mask.shape[1],
    )


def _varlen_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float | None,
) -> torch.Tensor:
    """``(N, heads, D)`` FlashAttention over the packed sequences, causal within each.

    Calls aten's ``_flash_attention_forward`` rather than ``torch.nn.attention.varlen.varlen_attn``:
    that one is a Python custom op whose ``window_size: list[int]`` argument Inductor's C++ wrapper
    cannot pass ("arg type List[int] is not yet supported by custom_op_wrapper", torch 2.11), and
    the compiled recipe runs its layers under the C++ wrapper. The aten op has a C shim and its own
    backward, and FlashAttention takes grouped key/value heads as they are (no repeat).

    Unlike SDPA, the aten op is not on autocast's list, and FlashAttention computes in fp16/bf16
    only: a model kept in fp32 under autocast (the plain loop, the tiny test model) reaches it with
    fp32 queries from its fp32 q/k norms, so they are cast to the autocast dtype as SDPA's would be."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        if not torch.is_autocast_enabled("cuda"):
            raise ValueError(
                f"packed LLM sequences on CUDA run FlashAttention, which takes fp16 or bf16, got {query.dtype}: "
                "train with trainer.precision: bf16 or set trainer.pack_llm_sequences: false"
            )
        half = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(half), key.to(half), value.to(half)
    output, *_ = torch.ops.aten._flash_attention_forward(
        query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length,
        0.0,  # dropout
        True,  # causal: each position attends to its own sequence's earlier positions
        False,  # no debug mask
        scale=scale,
    )  # fmt: skip
    return output


def _masked_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """The same as ``_varlen_causal_attention`` through SDPA and a dense block-diagonal causal mask."""
    length = query.shape[0]
    index = torch.arange(length, device=query.device)
    sequence = torch.searchsorted(cu_seq_lens[1:].to(index.dtype), index, right=True)  # (N,)
    allowed = (sequence[:, None] == sequence[None, :]) & (index[:, None] >= index[None, :])
    output = nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), attn_mask=allowed, scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip
    return output.transpose(0, 1)


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    *,
    cu_seq_lens_q: torch.Tensor,
    max_length_q: int,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention over one packed row ``(1, heads, N, D)``, as ``packed_attention_in``
    switches it on around the packed loss's call (which passes ``PackedSequences.model_kwargs``)."""
    if query.shape[0] != 1 or dropout or sliding_window:
        raise ValueError(
            "packed attention takes one packed row without attention dropout or a sliding window, got "
            f"batch {query.shape[0]}, dropout {dropout}, sliding window {sliding_window}"
        )
    query, key, value = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # (N, heads, D)
    if query.device.type == "cuda":
        output = _varlen_causal_attention(query, key, value, cu_seq_lens_q, max_length_q, scaling)
    else:
        output = _masked_causal_attention(query, key, value, cu_seq_lens_q, scaling)
    return output.unsqueeze(0), None  # (1, N, heads, D), as transformers' attention functions return


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def packed_attention_in(config) -> contextlib.AbstractContextManager[None]:
    """The LLM runs ``packed_attention`` inside; generation and the padded loss keep their attention."""
    return attention_implementation(config, PACKED_ATTENTION)
