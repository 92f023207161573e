"""Moving a collated batch (tensors plus id/text lists) to the training device."""

from __future__ import annotations

import torch


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors go to ``device`` (non-blocking from pinned memory); lists and metrics stay on the host."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }
