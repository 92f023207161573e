"""``salm data prepare``: NeMo JSON manifests or Lhotse cut manifests -> Lhotse Shar, on Ray.

The driver streams the manifests and cuts them into chunks of ``shard_size`` entries; one Ray task
per chunk writes one output shard (``cuts.N.jsonl.gz`` + ``recording.N.tar``), so a cluster
prepares thousands of hours in parallel. A bad entry never stops the run: missing or unreadable
audio, empty text, or a duration that does not fit the audio file is skipped and counted by
reason; the summary says how much was kept and what was not. Nothing but shards is written to
the output directory: Lhotse's ``CutSet.from_shar(in_dir=...)`` treats every file there as a field.

NeMo manifest lines: ``audio_filepath`` (relative paths are relative to the manifest, as in
NeMo), ``duration``, ``text``, optional ``offset``, ``lang``, ``context``. Lhotse manifests
(``.jsonl`` / ``.jsonl.gz`` of cuts) keep their ids, supervisions and custom fields.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from salm.errors import SALMConfigError

AUDIO_FORMATS = ("flac", "wav", "original")
SKIP_REASONS = (
    "malformed manifest line",
    "missing audio file",
    "unreadable audio",
    "empty text",
    "duration mismatch",
)


@dataclass
class PrepareSummary:
    """What ``prepare_shar`` wrote and what it left out."""

    output_dir: str
    shards: int = 0
    utterances: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def describe(self) -> str:
        lines = [
            f"wrote {self.shards} shard(s) to {self.output_dir}: {self.utterances} utterances, "
            f"{self.hours:.3f} h; skipped {self.num_skipped}"
        ]
        lines += [f"  skipped ({reason}): {count}" for reason, count in sorted(self.skipped.items())]
        return "\n".join(lines)


@dataclass
class _Entry:
    """One manifest line: a NeMo dict (``kind='nemo'``) or a Lhotse cut dict (``kind='lhotse'``)."""

    kind: str
    data: dict
    index: int  # running number over all manifests; names NeMo cuts uniquely
    base_dir: str


def read_entries(manifests: list[str], skipped: Counter) -> Iterator[_Entry]:
    """Stream the entries of every manifest; malformed lines are counted in ``skipped``."""
    from lhotse.serialization import open_best

    index = 0
    for manifest in manifests:
        if not Path(manifest).is_file():
            raise SALMConfigError(f"manifest {manifest!r} does not exist")
        with open_best(manifest, "r") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    if not isinstance(data, dict):
                        raise ValueError("not a JSON object")
                except ValueError:
                    skipped["malformed manifest line"] += 1
                    continue
                kind = "nemo" if "audio_filepath" in data else "lhotse"
                yield _Entry(kind, data, index, str(Path(manifest).resolve().parent))
                index += 1


def _nemo_cut(entry: _Entry, tolerance: float):
    """Build a Lhotse cut from a NeMo manifest entry, or return the reason it must be skipped."""
    from lhotse import Recording, SupervisionSegment

    data = entry.data
    path = Path(str(data["audio_filepath"]))
    if not path.is_absolute():
        path = Path(entry.base_dir) / path
    if not path.is_file():
        return "missing audio file"
    text = str(data.get("text") or "").strip()
    if not text:
        return "empty text"
    cut_id = str(data.get("id") or f"{path.stem}-{entry.index:08d}")
    try:
        recording = Recording.from_file(path, recording_id=cut_id)
    except Exception:  # soundfile/ffmpeg raise many types for corrupt headers
        return "unreadable audio"
    offset = float(data.get("offset") or 0.0)
    available = recording.duration - offset
    duration = float(data["duration"]) if data.get("duration") is not None else available
    if duration <= 0 or duration > available + tolerance:
        return "duration mismatch"
    duration = min(duration, available)
    cut = recording.to_cut().truncate(offset=offset, duration=duration, preserve_id=True)
    cut.id = cut_id
    cut.supervisions = [
        SupervisionSegment(
            id=cut_id,
            recording_id=recording.id,
            start=0.0,
            duration=cut.duration,
            channel=cut.channel,
            text=text,
            language=data.get("lang"),
        )
    ]
    if data.get("context"):
        cut.custom = {"context": str(data["context"])}
    return cut


def _lhotse_cut(entry: _Entry):
    from lhotse.serialization import deserialize_item

    try:
        cut = deserialize_item(entry.data)
    except Exception:
        return "malformed manifest line"
    if not any((s.text or "").strip() for s in cut.supervisions):
        return "empty text"
    return cut


def write_shard(
    entries: list[_Entry], output_dir: str, shard_index: int, audio_format: str, tolerance: float
):
    """Write one Shar shard; returns (utterances, seconds, skipped-by-reason). Runs as a Ray task."""
    from lhotse.shar import SharWriter

    skipped: Counter = Counter()
    utterances, seconds = 0, 0.0
    with SharWriter(
        output_dir,
        fields={"recording": audio_format},
        shard_size=max(1, len(entries)),
        shard_offset=shard_index,
    ) as writer:
        for entry in entries:
            cut = _nemo_cut(entry, tolerance) if entry.kind == "nemo" else _lhotse_cut(entry)
            if isinstance(cut, str):
                skipped[cut] += 1
                continue
            try:
                writer.write(cut)  # loads (and re-encodes) the audio: corrupt data fails here
            except FileNotFoundError:
                skipped["missing audio file"] += 1
                continue
            except Exception:
                skipped["unreadable audio"] += 1
                continue
            utterances += 1
            seconds += cut.duration
    return utterances, seconds, dict(skipped)


def prepare_shar(
    manifests: list[str],
    output_dir: str,
    *,
    shard_size: int = 1000,
    audio_format: str = "flac",
    duration_tolerance: float = 0.1,
    max_in_flight: int | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Convert ``manifests`` into Shar shards under ``output_dir`` with one Ray task per shard.

    Starts a local Ray instance if none is running (``ray job submit`` provides one).
    """
    import ray
    from tqdm import tqdm

    if shard_size < 1:
        raise SALMConfigError(f"`--shard-size` must be >= 1, got {shard_size}")
    if audio_format not in AUDIO_FORMATS:
        raise SALMConfigError(
            f"`--audio-format` must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}"
        )
    out = Path(output_dir)
    if out.exists() and any(out.glob("cuts.*.jsonl.gz")):
        raise SALMConfigError(
            f"output directory {output_dir!r} already holds Shar shards; choose an empty one"
        )
    out.mkdir(parents=True, exist_ok=True)  # Lhotse's writers do not create it
    if not ray.is_initialized():
        ray.init()
    max_in_flight = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))

    driver_skips: Counter = Counter()
    total_entries = _count_entries(manifests)
    num_shards = math.ceil(total_entries / shard_size)
    task = ray.remote(num_cpus=1)(write_shard)
    summary = PrepareSummary(output_dir=str(out))
    skipped: Counter = Counter()

    def collect(done: list) -> None:
        for utterances, seconds, shard_skips in ray.get(done):
            summary.shards += int(utterances > 0)
            summary.utterances += utterances
            summary.seconds += seconds
            skipped.update(shard_skips)
            bar.update(1)

    in_flight: list = []
    with tqdm(total=num_shards, desc="shards", unit="shard", disable=not progress) as bar:
        chunk: list[_Entry] = []
        shard_index = 0
        for entry in read_entries(manifests, driver_skips):
            chunk.append(entry)
            if len(chunk) == shard_size:
                in_flight.append(task.remote(chunk, str(out), shard_index, audio_format, duration_tolerance))
                chunk, shard_index = [], shard_index + 1
                if len(in_flight) >= max_in_flight:
                    done, in_flight = ray.wait(in_flight, num_returns=1)
                    collect(done)
        if chunk:
            in_flight.append(task.remote(chunk, str(out), shard_index, audio_format, duration_tolerance))
        while in_flight:
            done, in_flight = ray.wait(in_flight, num_returns=1)
            collect(done)
    skipped.update(driver_skips)
    summary.skipped = dict(skipped)
    return summary


def _count_entries(manifests: list[str]) -> int:
    """Number of non-empty lines, for the progress bar (cheap next to the audio work)."""
    from lhotse.serialization import open_best

    total = 0
    for manifest in manifests:
        if not Path(manifest).is_file():
            raise SALMConfigError(f"manifest {manifest!r} does not exist")
        with open_best(manifest, "r") as lines:
            total += sum(1 for line in lines if line.strip())
    return total
