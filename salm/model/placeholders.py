"""Swap each audio placeholder token for that audio's encoder frames, for a whole batch at once.

NeMo's SALM does this with a Python loop over examples and segments; here every token and every
audio frame gets its destination column from cumulative sums, and one ``index_put`` writes them.
The result is the same tensor NeMo builds (tests compare both): sequences left-padded to the
longest one, targets ``-100`` on prompt, audio and padding positions.

``plan_splice`` is the index half (destinations, attention mask, targets); it needs two counts, the
placeholders' places and the longest row, which a GPU must read back before it can go on. The
training loop plans them on the host (``salm.model.batch_layout``), so the step never waits there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from salm.errors import PromptError

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index


@dataclass(frozen=True)
class Splice:
    """Where every input token and audio frame goes in the spliced rows (integer index math only).

    ``dest`` holds one flat destination per input token (row-major) and then per audio frame
    (``(N, L)`` row-major) in ``(B, row_stride)`` rows; column ``length`` of each row is a discard
    slot for leading padding, placeholders and frames past an audio's length.
    """

    dest: torch.Tensor  # (B*T + N*L,)
    attention_mask: torch.Tensor  # (B, T') bool
    targets: torch.Tensor | None  # (B, T') with IGNORE_INDEX where no loss is wanted
    length: int  # T': the longest spliced row

    @property
    def row_stride(self) -> int:
        """T' + 1: each row's columns and its discard slot."""
        return self.length + 1


def find_placeholders(
    input_ids: torch.Tensor, placeholder_id: int, num_audios: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the audio placeholders, row-major as the audios are ordered.

    Found once as integer indices: on a GPU each boolean-mask indexing (and each count read back)
    waits for the device to catch up. Raises ``PromptError`` unless there is one per audio.
    """
    is_placeholder = input_ids == placeholder_id
    rows, cols = is_placeholder.nonzero(as_tuple=True)  # (N,), (N,)
    if rows.numel() != num_audios:
        per_example = is_placeholder.sum(dim=1).tolist()
        raise PromptError(
            f"the prompts hold {rows.numel()} audio placeholders (per example: {per_example}) "
            f"but {num_audios} audios were given; each audio needs exactly one placeholder"
        )
    return rows, cols


def plan_splice(
    input_ids: torch.Tensor,
    audio_lens: torch.Tensor,
    max_frames: int,
    placeholder_id: int,
    padding_id: int,
    target_ids: torch.Tensor | None = None,
    placeholders: tuple[torch.Tensor, torch.Tensor] | None = None,
    length: int | None = None,
) -> Splice:
    """The ``Splice`` of a batch whose N audios have ``audio_lens`` frames (padded to ``max_frames``).

    ``placeholders`` (from ``find_placeholders``) and ``length`` (T') may come from a host-side
    ``BatchLayout``: then nothing here reads a device value back. Left out, they are found from
    ``input_ids`` and ``audio_lens`` (a GPU waits for each).
    """
    batch, _ = input_ids.shape
    device = input_ids.device
    is_placeholder = input_ids == placeholder_id
    placeholder_rows, placeholder_cols = (
        placeholders
        if placeholders is not None
        else find_placeholders(input_ids, placeholder_id, audio_lens.shape[0])
    )
    # Only the leading (left) padding is dropped; a pad id inside the text keeps its slot, masked out.
    is_leading_pad = (input_ids != padding_id).cumsum(dim=1) == 0

    widths = torch.where(is_leading_pad, 0, torch.ones_like(input_ids))  # output slots of each input token
    widths = widths.index_put((placeholder_rows, placeholder_cols), audio_lens.to(widths.dtype))
    ends = widths.cumsum(dim=1)  # (B, T)
    out_lens = ends[:, -1]  # (B,)
    out_length = int(out_lens.max()) if length is None else length
    starts = ends - widths + (out_length - out_lens).unsqueeze(1)  # left-pad offset per row
    row_stride = out_length + 1  # one spare "discard" column per row for tokens that take no slot
    discard = torch.arange(batch, device=device).unsqueeze(1) * row_stride + out_length  # (B, 1)

    is_text = ~(is_placeholder | is_leading_pad)
    text_dest = torch.where(
        is_text, torch.arange(batch, device=device).unsqueeze(1) * row_stride + starts, discard
    )  # (B, T) flat destinations

    frame = torch.arange(max_frames, device=device)  # (L,)
    audio_starts = placeholder_rows * row_stride + starts[placeholder_rows, placeholder_cols]  # (N,)
    frame_valid = frame.unsqueeze(0) < audio_lens.unsqueeze(1)  # (N, L)
    audio_dest = torch.where(
        frame_valid,
        audio_starts.unsqueeze(1) + frame,
        (placeholder_rows * row_stride + out_length).unsqueeze(1),
    )  # (N, L)
    dest = torch.cat([text_dest.reshape(-1), audio_dest.reshape(-1)])

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
    return Splice(dest=dest, attention_mask=attention_mask, targets=targets, length=out_length)


def replace_placeholders(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    audio_embeds: torch.Tensor,
    audio_lens: torch.Tensor,
    placeholder_id: int,
    padding_id: int,
    target_ids: torch.Tensor | None = None,
    placeholders: tuple[torch.Tensor, torch.Tensor] | None = None,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Insert audio frames where ``input_ids == placeholder_id``.

    Args:
        input_ids: (B, T) token ids, left-padded with ``padding_id``.
        embeds: (B, T, H) embeddings of ``input_ids`` (placeholder rows are ignored).
        audio_embeds: (N, L, H) encoder frames of the N audios, in the order their placeholders
            appear in ``input_ids`` read row by row.
        audio_lens: (N,) valid frames per audio.
        target_ids: optional (B, T) targets with ``IGNORE_INDEX`` where no loss is wanted.
        placeholders, length: known in advance (a host-side ``BatchLayout``), see ``plan_splice``.

    Returns:
        ``(embeds, targets, attention_mask)`` of shapes (B, T', H), (B, T') or None, (B, T').
    """
    batch, _ = input_ids.shape
    hidden = embeds.shape[-1]
    splice = plan_splice(
        input_ids,
        audio_lens,
        audio_embeds.shape[1],
        placeholder_id,
        padding_id,
        target_ids,
        placeholders,
        length,
    )
    values = torch.cat([embeds.reshape(-1, hidden), audio_embeds.to(embeds.dtype).reshape(-1, hidden)])
    out = embeds.new_zeros(batch * splice.row_stride, hidden).index_put((splice.dest,), values)
    out = out.view(batch, splice.row_stride, hidden)[:, : splice.length]  # (B, T', H)
    return out, splice.targets, splice.attention_mask


def gather_target_positions(
    hidden: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden states at the target positions (K, H), their target ids (K,))``, in the batch's order.

    ``hidden`` is ``(B, T, H)`` (or one packed row) and ``targets`` ``(B, T)`` with ``IGNORE_INDEX``
    where no loss is wanted. The positions are integer indices: a boolean-mask gather would wait for
    a GPU again in its backward, between the LLM's gradients and the encoder's. ``positions`` (flat,
    from a host-side ``BatchLayout``) saves the one wait that finding them costs.
    """
    index = (
        (targets != IGNORE_INDEX).flatten().nonzero().squeeze(1) if positions is None else positions
    )  # (K,)
    return hidden.flatten(0, 1).index_select(0, index), targets.flatten().index_select(0, index)
