"""Transcripts rendered in OpenAI's ``response_format``s: json, text, verbose_json, srt, vtt.

Segments are the pieces the audio was cut into at quiet points (one for audio under the chunk
limit). Fields that Whisper fills from its decoder (``avg_logprob``, ``no_speech_prob``) are not
computed here and are reported as 0.0 so that OpenAI clients parse the response.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

ResponseFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Transcript:
    segments: list[Segment]
    duration: float
    temperature: float
    language: str

    @property
    def text(self) -> str:
        return " ".join(segment.text for segment in self.segments if segment.text)


def as_json(transcript: Transcript) -> dict:
    return {"text": transcript.text, "usage": {"type": "duration", "seconds": math.ceil(transcript.duration)}}


def as_verbose_json(transcript: Transcript) -> dict:
    return {
        "task": "transcribe",
        "language": transcript.language,
        "duration": transcript.duration,
        "text": transcript.text,
        "segments": [
            {
                "id": index,
                "seek": round(segment.start * 100),  # Whisper counts seek in 10 ms frames
                "start": segment.start,
                "end": segment.end,
                "text": segment.text,
                "tokens": segment.token_ids,
                "temperature": transcript.temperature,
                "avg_logprob": 0.0,
                "compression_ratio": _compression_ratio(segment.text),
                "no_speech_prob": 0.0,
            }
            for index, segment in enumerate(transcript.segments)
        ],
        "usage": {"type": "duration", "seconds": math.ceil(transcript.duration)},
    }


def as_srt(transcript: Transcript) -> str:
    blocks = [
        f"{index}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
        for index, s in enumerate(transcript.segments, start=1)
    ]
    return "\n".join(blocks)


def as_vtt(transcript: Transcript) -> str:
    blocks = [
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in transcript.segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def _timestamp(seconds: float, decimal_mark: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{millis:03d}"


def _compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0
