"""Uploaded bytes -> checked mono waveforms at the model's rate, and long audio cut at quiet points.

This runs in the CPU ingress so that transcriber replicas only ever see float arrays: a corrupt or
hostile upload fails here, with a message, and never reaches the model. Decoding goes through
Lhotse (soundfile: wav, flac, mp3, ogg) like ``salm.audio`` does for files, so served and offline
transcription see the same samples.
"""

from __future__ import annotations

import numpy as np
from lhotse import Recording

SUPPORTED_FORMATS = "wav, flac, mp3 or ogg"
# Cuts are searched in the last QUIET_SEARCH_FRACTION of each chunk, on 20 ms energy frames.
QUIET_SEARCH_FRACTION = 0.25
ENERGY_FRAME_S = 0.02


class BadAudioError(ValueError):
    """The upload is not decodable audio, or holds none (HTTP 400)."""


class AudioTooLongError(ValueError):
    """The audio is longer than the server's hard limit (HTTP 413)."""


def decode_audio(data: bytes, sampling_rate: int, max_audio_s: float) -> np.ndarray:
    """Decode an uploaded file to mono float32 at ``sampling_rate``: shape ``(num_samples,)``.

    The duration is checked from the header before the samples are decoded, so an over-long
    upload costs no decoding time.
    """
    if not data:
        raise BadAudioError(f"the uploaded file is empty; send {SUPPORTED_FORMATS} audio")
    try:
        recording = Recording.from_bytes(data, recording_id="upload")
    except Exception as error:  # soundfile raises several types for non-audio and corrupt input
        raise BadAudioError(
            f"the upload could not be decoded as audio ({SUPPORTED_FORMATS}): {type(error).__name__}"
        ) from error
    if recording.num_samples == 0:
        raise BadAudioError("the uploaded audio holds no samples (zero length)")
    if recording.duration > max_audio_s:
        raise AudioTooLongError(
            f"the audio lasts {recording.duration:.1f} s but this server accepts at most {max_audio_s:g} s "
            "per request; split it and send the parts separately"
        )
    try:
        if recording.sampling_rate != sampling_rate:
            recording = recording.resample(sampling_rate)
        samples = recording.load_audio()  # (channels, samples)
    except Exception as error:  # a valid header followed by corrupt frames
        raise BadAudioError(f"the uploaded audio is corrupt: {type(error).__name__}: {error}") from error
    if samples.size == 0:
        raise BadAudioError("the uploaded audio holds no samples (zero length)")
    mono = samples.mean(axis=0).astype(np.float32)
    if not np.isfinite(mono).all():
        raise BadAudioError("the uploaded audio contains NaN or infinite samples")
    return mono


def split_at_quiet_points(
    samples: np.ndarray, sampling_rate: int, max_chunk_s: float
) -> list[tuple[int, int]]:
    """Cut a waveform into contiguous ``(start, end)`` sample ranges no longer than ``max_chunk_s``.

    Each cut is placed at the quietest 20 ms frame in the last quarter of the chunk, so words are
    rarely split; audio that fits in one chunk is returned whole.
    """
    max_len = int(max_chunk_s * sampling_rate)
    if max_len <= 0:
        raise ValueError(f"`max_chunk_s` must be > 0, got {max_chunk_s}")
    total = len(samples)
    if total <= max_len:
        return [(0, total)]
    frame = max(1, int(ENERGY_FRAME_S * sampling_rate))
    num_frames = total // frame
    energy = (
        np.square(samples[: num_frames * frame].astype(np.float64)).reshape(num_frames, frame).mean(axis=1)
    )
    pieces, start = [], 0
    while total - start > max_len:
        # Frames lying wholly inside [start + (1 - fraction) * max_len, start + max_len].
        first = -(-(start + int((1 - QUIET_SEARCH_FRACTION) * max_len)) // frame)
        last = (start + max_len) // frame  # exclusive
        if last > first:
            quietest = first + int(np.argmin(energy[first:last]))
            cut = quietest * frame + frame // 2
        else:  # chunks shorter than a frame or two: no room to search
            cut = start + max_len
        pieces.append((start, cut))
        start = cut
    pieces.append((start, total))
    return pieces
