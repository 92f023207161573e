"""Where a training batch's tokens and audio frames land in the LLM's rows, worked out on the host.

Why: the loss gathers three times by counts that live in the batch: the audio splice (where the
placeholders are, how long the longest spliced row is), the packed row (which positions are real)
and the LM head (which positions have a target). Found on the GPU, each count is read back before
its gather can be launched: four times per forward the host stops and waits for the device to
drain its queue, and loses the lead it had built (``bench/host_syncs.py`` lists them). The collated
batch already holds every one of those counts on the host: the token ids, the loss mask, and the
audio lengths in samples, which the mel front end and the subsampling turn into frame counts by
fixed arithmetic (``AudioPerception.frame_counts``). The training loop computes this layout in its
prefetch thread, off the step's path, and copies it to the GPU with the batch; the forward then
reads no device value at all.

The layout is the same ``plan_splice`` the forward runs, applied to host tensors, so the indices
cannot drift from the forward's own. The one input the host must predict, the encoder's frame
counts, is checked against the encoder's on the device without a wait (``torch._assert_async``).

Batches without a layout (validation, inference, a model whose frame counts ``frame_counts``
cannot predict) take the same indices from the device, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from salm.model.placeholders import IGNORE_INDEX, find_placeholders, plan_splice


@dataclass(frozen=True)
class BatchLayout:
    """Integer indices of one batch's LLM rows, computed where the batch was collated."""

    placeholder_rows: torch.Tensor  # (N,) the row of each audio's placeholder, in the audios' order
    placeholder_cols: torch.Tensor  # (N,) its column in ``input_ids``
    audio_frames: torch.Tensor  # (N,) the frames the encoder gives each audio (checked on the device)
    spliced_length: int  # T': the longest row once every placeholder became its audio's frames
    real_positions: torch.Tensor  # (P,) flat indices of the real positions of the (B, T'-1) LLM inputs
    target_positions: torch.Tensor  # (K,) flat indices of the positions with a target, in (B, T'-1)
    packed_target_positions: torch.Tensor  # (K',) the same counted along the packed row of real positions

    def _map_tensors(self, function) -> BatchLayout:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: function(v) for k, v in values.items() if isinstance(v, torch.Tensor)})

    def to(self, device: torch.device, non_blocking: bool = False) -> BatchLayout:
        return self._map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> BatchLayout:
        return self._map_tensors(torch.Tensor.pin_memory)


def batch_layout(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    audio_frames: torch.Tensor,
    placeholder_id: int,
    padding_id: int,
) -> BatchLayout:
    """The layout of a collated batch (``input_ids``/``loss_mask`` (B, T), ``audio_frames`` (N,)), on their device.

    ``SALM.prepare_inputs`` shifts the spliced rows by one (inputs ``[:, :-1]``, targets ``[:, 1:]``):
    the positions here index those shifted ``(B, T'-1)`` rows. Raises ``PromptError`` when the
    placeholders do not match the audios one to one, as the forward would.
    """
    placeholders = find_placeholders(input_ids, placeholder_id, audio_frames.shape[0])
    max_frames = int(audio_frames.max()) if audio_frames.numel() else 0
    splice = plan_splice(
        input_ids,
        audio_frames,
        max_frames,
        placeholder_id,
        padding_id,
        target_ids=input_ids.masked_fill(~loss_mask, IGNORE_INDEX),
        placeholders=placeholders,
    )
    is_real = splice.attention_mask[:, :-1].flatten()
    has_target = splice.targets[:, 1:].flatten() != IGNORE_INDEX
    real_positions = is_real.nonzero().squeeze(1)
    return BatchLayout(
        placeholder_rows=placeholders[0],
        placeholder_cols=placeholders[1],
        audio_frames=audio_frames.to(torch.int64),
        spliced_length=splice.length,
        real_positions=real_positions,
        target_positions=has_target.nonzero().squeeze(1),
        packed_target_positions=has_target.index_select(0, real_positions).nonzero().squeeze(1),
    )
