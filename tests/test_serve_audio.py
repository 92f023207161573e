"""Upload decoding and long-audio splitting in the serving ingress (no Ray needed)."""

import io

import numpy as np
import pytest
import soundfile as sf

from serve.audio import AudioTooLongError, BadAudioError, decode_audio, split_at_quiet_points

RATE = 16000


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate"),
    [("WAV", None, 8000), ("FLAC", None, 44100), ("MP3", None, 44100), ("OGG", "VORBIS", 48000)],
)
def test_supported_formats_decode_to_mono_at_the_model_rate(fmt: str, subtype: str | None, rate: int) -> None:
    data = encode(tone(1.5, rate, channels=2), rate, fmt, subtype)
    samples = decode_audio(data, RATE, max_audio_s=60)
    assert samples.ndim == 1 and samples.dtype == np.float32
    assert abs(len(samples) / RATE - 1.5) < 0.1  # mp3/ogg add a few ms of codec delay
    assert 0.1 < np.abs(samples).max() < 1.0


def test_stereo_is_averaged_not_one_channel_kept() -> None:
    left, right = tone(1.0, RATE), np.zeros(RATE, np.float32)
    samples = decode_audio(encode(np.stack([left, right], axis=1), RATE, "WAV"), RATE, max_audio_s=60)
    np.testing.assert_allclose(samples, left / 2, atol=1e-4)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"this is a text file, not audio\n" * 20,
        encode(tone(1.0, RATE), RATE, "WAV")[:30],  # truncated header
        np.random.default_rng(0).bytes(4000),
        encode(np.zeros(0, np.float32), RATE, "WAV"),  # valid header, zero samples
        encode(np.full(RATE, np.nan, np.float32), RATE, "WAV", "FLOAT"),
    ],
    ids=["empty", "text", "truncated", "random", "zero_length", "nan"],
)
def test_bad_uploads_raise_bad_audio_with_a_message(data: bytes) -> None:
    with pytest.raises(BadAudioError, match=r"\w+"):
        decode_audio(data, RATE, max_audio_s=60)


def test_audio_over_the_hard_limit_is_refused_before_decoding() -> None:
    data = encode(np.zeros(8000 * 31, np.float32), 8000, "WAV")
    with pytest.raises(AudioTooLongError, match="at most 30 s"):
        decode_audio(data, RATE, max_audio_s=30)


def test_short_audio_stays_in_one_piece() -> None:
    assert split_at_quiet_points(np.ones(RATE * 3, np.float32), RATE, max_chunk_s=4) == [(0, RATE * 3)]


def test_long_audio_is_cut_in_the_silences_between_words() -> None:
    # "speech" 3.4 s | silence 0.4 s | speech 3.4 s | silence 0.4 s | speech 3.4 s
    speech, gap = tone(3.4, RATE), np.zeros(int(0.4 * RATE), np.float32)
    samples = np.concatenate([speech, gap, speech, gap, speech])
    pieces = split_at_quiet_points(samples, RATE, max_chunk_s=4)

    assert pieces[0][0] == 0 and pieces[-1][1] == len(samples)
    assert all(end == next_start for (_, end), (next_start, _) in zip(pieces, pieces[1:], strict=False))
    assert all(end - start <= 4 * RATE for start, end in pieces)
    cuts_s = [end / RATE for _, end in pieces[:-1]]
    assert len(cuts_s) == 2
    assert 3.4 <= cuts_s[0] <= 3.8 and 7.2 <= cuts_s[1] <= 7.6


def test_audio_without_quiet_points_is_still_cut_within_the_limit() -> None:
    samples = tone(10.0, RATE)
    pieces = split_at_quiet_points(samples, RATE, max_chunk_s=4)
    assert len(pieces) == 3 and all(end - start <= 4 * RATE for start, end in pieces)
