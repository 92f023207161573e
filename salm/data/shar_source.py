"""Lhotse Shar shards as Ray Data read tasks: local paths or fsspec URLs, weighted mixing, seeded order.

A Shar directory holds ``cuts.NNNNNN.jsonl.gz`` (cut manifests) next to ``recording.NNNNNN.tar``
(for each cut, its encoded audio then its JSON metadata). A read task streams both files of a
shard in lockstep and yields *raw* rows: the cut id, the still-encoded audio bytes, the duration
from the manifest, the transcript and the optional per-cut ``context``. Decoding happens in the
next Ray Data stage (``salm.data.processing``).

Two modes:

* **finite** (validation, evaluation, epoch-based training): one read task per shard; each shard is
  read exactly once, in an order shuffled with ``seed + epoch``. Weights do not matter here.
* **infinite** (training bounded by ``max_steps``): ``num_workers`` read tasks that never end. Each
  one, like a NeMo dataloader worker, walks every shard of every source in its own seeded order
  (reshuffled every pass over a source) and picks the source of each next cut at random with the
  given weights (Lhotse's ``CutSet.mux`` semantics). Any subset of running read tasks therefore
  sees all the data, so a cluster short of CPUs slows the stream down but never skews it.

Bad data never stops a read: a malformed manifest line, a cut without supervision or audio, an
ID mismatch or a truncated tar is skipped, logged once with the cut id, and counted; the count
rides along with the next row (column ``skipped``).
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import fsspec
import numpy as np
from lhotse.utils import streaming_shuffle

from salm.data.config import SharSourceSpec
from salm.errors import SALMConfigError

logger = logging.getLogger("salm.data")

RAW_COLUMNS = ("id", "audio_bytes", "duration", "text", "context", "skipped", "filtered")


@dataclass(frozen=True)
class ShardFiles:
    """The two files of one Shar shard, as fsspec URLs (plain paths for local files)."""

    cuts: str
    recording: str
    size_bytes: int | None = None


@dataclass(frozen=True)
class SharSource:
    """A weighted Shar directory with its shards listed."""

    path: str
    weight: float
    shards: tuple[ShardFiles, ...]


def list_shards(path: str) -> tuple[ShardFiles, ...]:
    """Find the ``cuts.N.jsonl.gz`` / ``recording.N.tar`` pairs under ``path`` (local dir or URL)."""
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise SALMConfigError(
            f"`data.shar_path` entry {path!r} is not a directory; point it at the output of `salm data prepare`"
        )
    listing = fs.ls(root, detail=True)
    files = {PurePosixPath(entry["name"]).name: entry for entry in listing}
    shards = []
    for name in sorted(files):
        if not (name.startswith("cuts.") and name.endswith(".jsonl.gz")):
            continue
        index = name[len("cuts.") : -len(".jsonl.gz")]
        recording = f"recording.{index}.tar"
        if recording not in files:
            raise SALMConfigError(
                f"`data.shar_path` entry {path!r}: {name} has no {recording} next to it "
                "(only Shar with audio in `recording` tars is supported)"
            )
        shards.append(
            ShardFiles(
                cuts=_url(fs, files[name]["name"]),
                recording=_url(fs, files[recording]["name"]),
                size_bytes=files[recording].get("size"),
            )
        )
    if not shards:
        raise SALMConfigError(
            f"`data.shar_path` entry {path!r} holds no Shar shards (cuts.NNNNNN.jsonl.gz + recording.NNNNNN.tar)"
        )
    return tuple(shards)


def _url(fs: fsspec.AbstractFileSystem, name: str) -> str:
    return name if fs.protocol in ("file", ("file", "local")) else fs.unstrip_protocol(name)


def resolve_sources(specs: list[SharSourceSpec]) -> list[SharSource]:
    """List the shards of every configured source (done once, on the driver)."""
    return [SharSource(spec.path, spec.weight, list_shards(spec.path)) for spec in specs]


@dataclass
class SkipLog:
    """Counts rows dropped in one worker process and logs each bad cut once.

    ``pending_*`` are handed to the next emitted row so that the train worker can report exact
    totals without any side channel.
    """

    pending_skipped: int = 0
    pending_filtered: int = 0
    _logged: set[str] = field(default_factory=set)

    def skip(self, cut_id: str, reason: str) -> None:
        """A cut that is broken (unreadable, truncated, empty): counted and logged once."""
        self.pending_skipped += 1
        if cut_id not in self._logged:
            self._logged.add(cut_id)
            logger.warning("skipping cut %r: %s", cut_id, reason)
        _count_metric(reason)

    def filter(self) -> None:
        """A valid cut left out on purpose (duration/token limits): counted, not logged."""
        self.pending_filtered += 1

    def take(self) -> tuple[int, int]:
        counts = (self.pending_skipped, self.pending_filtered)
        self.pending_skipped = self.pending_filtered = 0
        return counts


_SKIP_COUNTER = None


def _count_metric(reason: str) -> None:
    """Export skips as a Ray metric (dashboard/Prometheus) when running inside Ray."""
    global _SKIP_COUNTER
    try:
        import ray

        if not ray.is_initialized():
            return
        if _SKIP_COUNTER is None:
            from ray.util.metrics import Counter

            _SKIP_COUNTER = Counter(
                "salm_data_skipped_cuts", "Cuts skipped as bad data, by reason", tag_keys=("reason",)
            )
        _SKIP_COUNTER.inc(1, tags={"reason": reason.split(":")[0][:60]})
    except Exception:  # metrics are best effort; never fail a read because of them
        pass


def iter_shard(shard: ShardFiles, skips: SkipLog, max_duration: float | None = None) -> Iterator[dict]:
    """Yield the raw rows of one shard; broken cuts go to ``skips`` instead of raising.

    Cuts longer than ``max_duration`` are dropped here, before their audio is decoded.
    """
    try:
        cuts_file = fsspec.open(shard.cuts, "rb").open()
        tar_file = fsspec.open(shard.recording, "rb").open()
    except OSError as error:
        skips.skip(shard.cuts, f"shard cannot be opened: {error}")
        return
    with cuts_file, tar_file, gzip.open(cuts_file, "rt", encoding="utf-8") as lines:
        pairs = _tar_pairs(tar_file)
        tar_broken: str | None = None
        try:
            for number, line in enumerate(lines):
                try:
                    cut = json.loads(line)
                    cut_id = cut["id"]
                except (ValueError, KeyError, TypeError):
                    cut, cut_id = None, f"{shard.cuts}:{number + 1}"
                audio = None
                if tar_broken is None:
                    try:
                        name, audio = next(pairs)
                    except StopIteration:
                        tar_broken = "recording tar has fewer members than the cuts manifest"
                    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
                        tar_broken = f"recording tar is truncated or corrupt: {error}"
                    else:
                        if cut is not None and name != cut_id:
                            skips.skip(cut_id, f"audio member {name!r} does not match the cut id")
                            continue
                if tar_broken is not None:
                    skips.skip(cut_id, tar_broken)
                    continue
                if cut is None:
                    skips.skip(cut_id, "malformed line in the cuts manifest")
                    continue
                row = _raw_row(cut, audio, skips)
                if row is None:
                    continue
                if max_duration is not None and row["duration"] > max_duration:
                    skips.filter()
                    continue
                yield row
        except (OSError, EOFError, ValueError) as error:  # truncated gzip manifest
            skips.skip(shard.cuts, f"cuts manifest is truncated or corrupt: {error}")


def _tar_pairs(fileobj) -> Iterator[tuple[str, bytes | None]]:
    """(cut id, audio bytes or None) for each data+metadata member pair of a Shar tar."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        members = iter(tar)
        for data in members:
            path = PurePosixPath(data.name)
            # A streamed tar cannot seek back: read the payload before the next header.
            payload = None if path.suffix == ".nodata" else tar.extractfile(data).read()
            if next(members, None) is None:
                raise tarfile.ReadError(f"member {data.name!r} has no metadata member after it")
            yield path.stem, payload


def _raw_row(cut: dict, audio: bytes | None, skips: SkipLog) -> dict | None:
    cut_id = cut["id"]
    supervisions = cut.get("supervisions") or []
    if not supervisions:
        skips.skip(cut_id, "cut has no supervision (no transcript)")
        return None
    if not audio:
        skips.skip(cut_id, "cut has no audio in the recording tar")
        return None
    text = " ".join(str(s.get("text") or "").strip() for s in supervisions).strip()
    custom = cut.get("custom") or {}
    context = custom.get("context") or (supervisions[0].get("custom") or {}).get("context") or ""
    skipped, filtered = skips.take()
    return {
        "id": cut_id,
        "audio_bytes": audio,
        "duration": float(cut.get("duration", 0.0)),
        "text": text,
        "context": str(context),
        "skipped": skipped,
        "filtered": filtered,
    }


def tombstone(skips: SkipLog) -> dict | None:
    """A row with an empty id that only carries counts left over at the end of a read."""
    skipped, filtered = skips.take()
    if not skipped and not filtered:
        return None
    return {
        "id": "",
        "audio_bytes": b"",
        "duration": 0.0,
        "text": "",
        "context": "",
        "skipped": skipped,
        "filtered": filtered,
    }


def endless_source(source: SharSource, rng: random.Random, skips: SkipLog, **kwargs) -> Iterator[dict]:
    """Every shard of ``source`` in a fresh random order on each pass, forever."""
    for _ in itertools.count():
        order = list(source.shards)
        rng.shuffle(order)
        produced = False
        for shard in order:
            for row in iter_shard(shard, skips, **kwargs):
                produced = True
                yield row
        if not produced:
            raise SALMConfigError(
                f"`data.shar_path` entry {source.path!r} has no readable cut within the duration limits"
            )


def mux(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Pick the stream of each next row at random with ``weights`` (Lhotse's ``CutSet.mux``)."""
    indices = range(len(streams))
    while True:
        (index,) = rng.choices(indices, weights=weights)
        yield next(streams[index])


def to_block(rows: list[dict]):
    """Turn raw rows into one Ray Data block (a pyarrow table)."""
    from ray.data.block import BlockAccessor

    audio = np.empty(len(rows), dtype=object)
    audio[:] = [row["audio_bytes"] for row in rows]
    batch = {
        "id": np.array([row["id"] for row in rows], dtype=object),
        "audio_bytes": audio,
        "duration": np.array([row["duration"] for row in rows], dtype=np.float64),
        "text": np.array([row["text"] for row in rows], dtype=object),
        "context": np.array([row["context"] for row in rows], dtype=object),
        "skipped": np.array([row["skipped"] for row in rows], dtype=np.int64),
        "filtered": np.array([row["filtered"] for row in rows], dtype=np.int64),
    }
    return BlockAccessor.batch_to_block(batch)


def blocks(rows: Iterator[dict], skips: SkipLog, rows_per_block: int) -> Iterator:
    """Group rows into blocks; a final tombstone carries counts that no row could take."""
    pending: list[dict] = []
    for row in rows:
        pending.append(row)
        if len(pending) >= rows_per_block:
            yield to_block(pending)
            pending = []
    last = tombstone(skips)
    if last is not None:
        pending.append(last)
    if pending:
        yield to_block(pending)


def make_datasource(
    sources: list[SharSource],
    *,
    infinite: bool,
    num_workers: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    shuffle_buffer_size: int,
    max_duration: float | None,
    rows_per_block: int = 16,
):
    """A Ray Data ``Datasource`` over ``sources`` (see the module docstring for the two modes)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def _shuffled(rows: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if shuffle and shuffle_buffer_size > 1:
            return streaming_shuffle(rows, bufsize=shuffle_buffer_size, rng=rng)
        return rows

    def finite_task(shard: ShardFiles, task_seed: str):
        def read():
            skips = SkipLog()
            rows = iter_shard(shard, skips, max_duration=max_duration)
            yield from blocks(_shuffled(rows, random.Random(task_seed)), skips, rows_per_block)

        return read

    def infinite_task(task_index: int):
        def read():
            skips = SkipLog()
            rng = random.Random(f"{seed}-{task_index}")
            streams = [
                endless_source(
                    source, random.Random(f"{seed}-{task_index}-{i}"), skips, max_duration=max_duration
                )
                for i, source in enumerate(sources)
            ]
            rows = mux(streams, [s.weight for s in sources], rng)
            yield from blocks(_shuffled(rows, rng), skips, rows_per_block)

        return read

    class SharDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_name(self) -> str:
            return "Shar"

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            def metadata(size: int | None) -> BlockMetadata:
                return BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=None)

            if infinite:
                return [ReadTask(infinite_task(i), metadata(None)) for i in range(num_workers)]
            shards = [shard for source in sources for shard in source.shards]
            if shuffle:
                random.Random(f"{seed}-{epoch}").shuffle(shards)
            return [
                ReadTask(finite_task(shard, f"{seed}-{epoch}-{i}"), metadata(shard.size_bytes))
                for i, shard in enumerate(shards)
            ]

    datasource = SharDatasource()
    num_tasks = num_workers if infinite else sum(len(source.shards) for source in sources)
    return datasource, num_tasks
