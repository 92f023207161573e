"""Real speech made offline with Debian's ``flite`` voices (and ``espeak-ng``), with transcripts.

flite's ``kal`` voice writes 8 kHz audio and the others 16 kHz; callers resample (Lhotse does
it on load). Nothing here is downloaded: the voices ship inside the Debian packages.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

FLITE_VOICES = ("kal16", "slt", "rms", "awb", "kal")
ESPEAK_VOICES = ("en-us", "en", "en-us+f3")
INSTALL_HINT = "install it with: apt-get install -y flite espeak-ng"

SUBJECTS = [
    "the old farmer",
    "a young girl",
    "my brother",
    "the teacher",
    "our neighbour",
    "the small dog",
    "a tired doctor",
    "the captain",
    "her friend",
    "the baker",
    "a quiet student",
    "the green parrot",
]
VERBS = [
    "found",
    "painted",
    "carried",
    "wanted",
    "opened",
    "cleaned",
    "bought",
    "followed",
    "watched",
    "dropped",
    "borrowed",
    "remembered",
]
OBJECTS = [
    "a red box",
    "the wooden door",
    "seven apples",
    "the blue car",
    "an empty bottle",
    "the heavy book",
    "two yellow chairs",
    "a broken clock",
    "the silver key",
    "four warm blankets",
    "the long letter",
    "a paper boat",
]
PLACES = [
    "near the river",
    "after dinner",
    "in the morning",
    "at the station",
    "before the storm",
    "behind the house",
    "on monday",
    "under the bridge",
    "in the garden",
    "at noon",
    "by the window",
    "during the game",
]


@dataclass(frozen=True)
class Utterance:
    path: Path
    text: str
    voice: str


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct simple English sentences from a fixed grammar (subject verb object place)."""
    rng = random.Random(seed)
    total = len(SUBJECTS) * len(VERBS) * len(OBJECTS) * len(PLACES)
    if count > total:
        raise ValueError(f"at most {total} distinct sentences, asked for {count}")
    chosen = rng.sample(range(total), count)
    sentences = []
    for index in chosen:
        index, place = divmod(index, len(PLACES))
        index, obj = divmod(index, len(OBJECTS))
        subject, verb = divmod(index, len(VERBS))
        sentences.append(f"{SUBJECTS[subject]} {VERBS[verb]} {OBJECTS[obj]} {PLACES[place]}")
    return sentences


def synthesize(text: str, voice: str, path: Path) -> None:
    """Speak ``text`` into the WAV file ``path`` with a flite voice or an ``espeak:<voice>``."""
    partial = path.with_name(path.name + ".partial")  # an interrupted run never leaves a truncated WAV
    if voice.startswith("espeak:"):
        command = ["espeak-ng", "-v", voice.split(":", 1)[1], "-w", str(partial), text]
    else:
        command = ["flite", "-voice", voice, "-t", text, "-o", str(partial)]
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"`{command[0]}` is not installed; {INSTALL_HINT}")
    subprocess.run(command, check=True, capture_output=True)
    partial.replace(path)


def synthesize_corpus(
    out_dir: str | Path, texts: list[str], voices: list[str], workers: int | None = None
) -> list[Utterance]:
    """Speak ``texts[i]`` with ``voices[i % len(voices)]`` into ``out_dir/NNNNNN.wav``; reuses existing files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    utterances = [
        Utterance(out_dir / f"{index:06d}.wav", text, voices[index % len(voices)])
        for index, text in enumerate(texts)
    ]

    def _make(utterance: Utterance) -> None:
        if not utterance.path.exists():
            synthesize(utterance.text, utterance.voice, utterance.path)

    with ThreadPoolExecutor(
        max_workers=workers or max(4, os.cpu_count() or 1)
    ) as pool:  # flite is one process per clip
        list(pool.map(_make, utterances))
    return utterances


def write_nemo_manifest(utterances: list[Utterance], path: str | Path) -> Path:
    """A NeMo JSON-lines manifest (``audio_filepath``, ``duration``, ``text``) for ``utterances``."""
    import json

    import soundfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as manifest:
        for utterance in utterances:
            info = soundfile.info(str(utterance.path))
            entry = {
                "audio_filepath": str(utterance.path),
                "duration": info.frames / info.samplerate,
                "text": utterance.text,
            }
            manifest.write(json.dumps(entry) + "\n")
    return path
