"""Swap each audio placeholder token for that audio's encoder frames, for a whole batch at once.

NeMo's SALM does this with a Python loop over examples and segments; here every token and every
audio frame gets its destination column from cumulative sums, and one ``index_put`` writes them.
The result is the same tensor NeMo builds (tests compare both): sequences left-padded to the
longest one, targets ``-100`` on prompt, audio and padding positions.
"""

from __future__ import annotations

import torch

from salm.errors import PromptError

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index


def replace_placeholders(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    audio_embeds: torch.Tensor,
    audio_lens: torch.Tensor,
    placeholder_id: int,
    padding_id: int,
    target_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Insert audio frames where ``input_ids == placeholder_id``.

    Args:
        input_ids: (B, T) token ids, left-padded with ``padding_id``.
        embeds: (B, T, H) embeddings of ``input_ids`` (placeholder rows are ignored).
        audio_embeds: (N, L, H) encoder frames of the N audios, in the order their placeholders
            appear in ``input_ids`` read row by row.
        audio_lens: (N,) valid frames per audio.
        target_ids: optional (B, T) targets with ``IGNORE_INDEX`` where no loss is wanted.

    Returns:
        ``(embeds, targets, attention_mask)`` of shapes (B, T', H), (B, T') or None, (B, T').
    """
    batch, length = input_ids.shape
    hidden = embeds.shape[-1]
    device = input_ids.device
    is_placeholder = input_ids == placeholder_id
    # Integer indices of the placeholders, row-major as the audios are ordered. Found once: on a GPU
    # each boolean-mask indexing (and each count read back) waits for the device to catch up.
    placeholder_rows, placeholder_cols = is_placeholder.nonzero(as_tuple=True)  # (N,), (N,)
    num_placeholders = placeholder_rows.numel()
    if num_placeholders != audio_lens.shape[0]:
        per_example = is_placeholder.sum(dim=1).tolist()
        raise PromptError(
            f"the prompts hold {num_placeholders} audio placeholders (per example: {per_example}) "
            f"but {audio_lens.shape[0]} audios were given; each audio needs exactly one placeholder"
        )
    # Only the leading (left) padding is dropped; a pad id inside the text keeps its slot, masked out.
    is_leading_pad = (input_ids != padding_id).cumsum(dim=1) == 0

    widths = torch.where(is_leading_pad, 0, torch.ones_like(input_ids))  # output slots of each input token
    widths = widths.index_put((placeholder_rows, placeholder_cols), audio_lens.to(widths.dtype))
    ends = widths.cumsum(dim=1)  # (B, T)
    out_lens = ends[:, -1]  # (B,)
    out_length = int(out_lens.max())
    starts = ends - widths + (out_length - out_lens).unsqueeze(1)  # left-pad offset per row
    row_stride = out_length + 1  # one spare "discard" column per row for tokens that take no slot
    discard = torch.arange(batch, device=device).unsqueeze(1) * row_stride + out_length  # (B, 1)

    is_text = ~(is_placeholder | is_leading_pad)
    text_dest = torch.where(
        is_text, torch.arange(batch, device=device).unsqueeze(1) * row_stride + starts, discard
    )  # (B, T) flat destinations

    frame = torch.arange(audio_embeds.shape[1], device=device)  # (L,)
    audio_rows = placeholder_rows  # (N,)
    audio_starts = audio_rows * row_stride + starts[placeholder_rows, placeholder_cols]  # (N,)
    frame_valid = frame.unsqueeze(0) < audio_lens.unsqueeze(1)  # (N, L)
    audio_dest = torch.where(
        frame_valid, audio_starts.unsqueeze(1) + frame, (audio_rows * row_stride + out_length).unsqueeze(1)
    )  # (N, L)

    dest = torch.cat([text_dest.reshape(-1), audio_dest.reshape(-1)])
    values = torch.cat([embeds.reshape(-1, hidden), audio_embeds.to(embeds.dtype).reshape(-1, hidden)])
    out = embeds.new_zeros(batch * row_stride, hidden).index_put((dest,), values)
    out = out.view(batch, row_stride, hidden)[:, :out_length]  # (B, T', H)

    attended = torch.cat([(is_text & (input_ids != padding_id)).reshape(-1), frame_valid.reshape(-1)])
    attention_mask = torch.zeros(batch * row_stride, dtype=torch.bool, device=device).index_put(
        (dest,), attended
    )
    attention_mask = attention_mask.view(batch, row_stride)[:, :out_length]

    targets = None
    if target_ids is not None:
        text_targets = torch.where(target_ids == padding_id, IGNORE_INDEX, target_ids)
        text_targets = torch.where(is_text, text_targets, IGNORE_INDEX)
        all_targets = torch.cat(
            [text_targets.reshape(-1), torch.full_like(audio_dest.reshape(-1), IGNORE_INDEX)]
        )
        targets = torch.full((batch * row_stride,), IGNORE_INDEX, dtype=torch.long, device=device)
        targets = targets.index_put((dest,), all_targets).view(batch, row_stride)[:, :out_length]
    return out, targets, attention_mask


def gather_target_positions(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden states at the target positions (K, H), their target ids (K,))``, in the batch's order.

    ``hidden`` is ``(B, T, H)`` (or one packed row) and ``targets`` ``(B, T)`` with ``IGNORE_INDEX``
    where no loss is wanted. The positions are found once as integer indices (one wait for a GPU to
    size them): a boolean-mask gather would wait again in its backward, between the LLM's gradients
    and the encoder's.
    """
    index = (targets != IGNORE_INDEX).flatten().nonzero().squeeze(1)  # (K,)
    return hidden.flatten(0, 1).index_select(0, index), targets.flatten().index_select(0, index)
