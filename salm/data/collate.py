"""Rows -> one training batch: audio right-padded, token ids LEFT-padded (as SALM's forward expects)."""

from __future__ import annotations

import numpy as np
import torch

from salm.audio import collate_audio


def collate_rows(rows: list[dict], pad_id: int) -> dict:
    """Stack ``rows`` (from ``build_dataset``) into tensors.

    Returns ``audios`` float32 (N, S_max) right-padded with zeros, ``audio_lens`` int64 (N,),
    ``input_ids`` int64 (B, T_max) left-padded with ``pad_id``, ``loss_mask`` bool (B, T_max)
    left-padded with False, and ``ids``/``texts``/``durations`` lists.
    """
    audios, audio_lens = collate_audio([row["audio"] for row in rows])
    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        input_ids[index, width - length :] = torch.from_numpy(np.asarray(row["input_ids"], dtype=np.int64))
        loss_mask[index, width - length :] = torch.from_numpy(np.asarray(row["loss_mask"], dtype=np.bool_))
    return {
        "audios": audios,
        "audio_lens": audio_lens,
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "ids": [str(row["id"]) for row in rows],
        "texts": [str(row["text"]) for row in rows],
        "durations": [float(row["duration"]) for row in rows],
    }


def padding_ratio(lengths: list[int] | torch.Tensor) -> float:
    """Padded positions / all positions when ``lengths`` are padded to their maximum."""
    lengths = torch.as_tensor(lengths)
    total = lengths.numel() * int(lengths.max())
    return 1.0 - float(lengths.sum()) / total if total else 0.0
