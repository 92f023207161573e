"""Read audio files into mono float32 arrays at the model's sampling rate (through Lhotse)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lhotse import Recording

from salm.errors import AudioLoadError


def load_audio(path: str | Path, sampling_rate: int) -> np.ndarray:
    """Decode ``path``, downmix to mono and resample to ``sampling_rate``: shape ``(num_samples,)``."""
    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(f"audio file {str(path)!r} does not exist")
    try:
        recording = Recording.from_file(path)
        if recording.sampling_rate != sampling_rate:
            recording = recording.resample(sampling_rate)
        samples = recording.load_audio()  # (channels, samples)
    except Exception as error:  # soundfile/ffmpeg raise many types for corrupt input
        raise AudioLoadError(f"could not decode audio file {str(path)!r}: {error}") from error
    if samples.size == 0:
        raise AudioLoadError(f"audio file {str(path)!r} holds no samples")
    return samples.mean(axis=0).astype(np.float32)


def collate_audio(clips: list[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D clips into ``(N, T_max)`` float32 plus their lengths ``(N,)``."""
    tensors = [torch.as_tensor(clip, dtype=torch.float32) for clip in clips]
    for index, clip in enumerate(tensors):
        if clip.ndim != 1 or clip.numel() == 0:
            raise AudioLoadError(
                f"audio #{index} must be a non-empty 1-D waveform, got shape {tuple(clip.shape)}"
            )
    lens = torch.tensor([t.numel() for t in tensors], dtype=torch.long)
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True), lens
