"""Per-feature normalisation of the mel features, as NeMo computes it, without its wait for the GPU.

Why: NeMo's ``normalize_batch`` (``normalize: per_feature``, the canary front end's setting) checks
``torch.any(seq_len == 1).item()`` on every batch whenever CUDA is available: the host stops at the
start of every training step and every served batch until the GPU has finished all queued work (the
one sync per step ``bench/train_throughput.py --profile`` found on an H100, BENCHMARKS.md). The check
only guards a clip of one mel frame (under 10 ms of audio), and NeMo's own arithmetic already
handles that case (its standard deviation becomes 0, then NeMo's ``CONSTANT``; on the CPU NeMo skips the
check). So ``take_over_per_feature_normalization`` turns NeMo's step off in the featurizer and
``AudioPerception`` calls ``normalize_per_feature`` on its output instead: the same numbers, no sync.
"""

from __future__ import annotations

import torch
from torch import nn


def take_over_per_feature_normalization(preprocessor: nn.Module) -> bool:
    """Turn off the per-feature normalisation inside NeMo's featurizer when it is configured, and
    return whether it was (the caller then normalises with ``normalize_per_feature``). Other
    normalisations (``all_features``, fixed statistics, none) stay with NeMo."""
    featurizer = getattr(preprocessor, "featurizer", None)
    if featurizer is None or getattr(featurizer, "normalize", None) != "per_feature":
        return False
    featurizer.normalize = None
    return True


def normalize_per_feature(features: torch.Tensor, lengths: torch.Tensor, pad_value: float) -> torch.Tensor:
    """Each mel bin of each clip to zero mean and unit (unbiased) standard deviation over the clip's
    own frames, and the frames past its length set to ``pad_value``: NeMo's ``normalize_batch``
    followed by its featurizer's padding mask, for ``features`` ``(B, n_mels, T)`` already padded.

    Frames past the length do not enter the statistics, so padding the input before (as NeMo's
    featurizer has done by the time this runs) changes nothing.
    """
    from nemo.collections.asr.parts.preprocessing.features import CONSTANT  # added to every std

    frames = torch.arange(features.shape[2], device=features.device)
    valid = (frames.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1)  # (B, 1, T)
    counts = valid.sum(dim=2)  # (B, 1): the length, or the frames there are if a length is longer
    mean = torch.where(valid, features, 0.0).sum(dim=2) / counts
    centred = torch.where(valid, features - mean.unsqueeze(2), 0.0)
    std = torch.sqrt(centred.pow(2).sum(dim=2) / (counts - 1.0))
    std = std.masked_fill(std.isnan(), 0.0) + CONSTANT  # one frame: 0/0, as in NeMo
    normalized = (features - mean.unsqueeze(2)) / std.unsqueeze(2)
    return normalized.masked_fill(~valid, pad_value)
