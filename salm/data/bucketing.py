"""Bucketing inside each train worker, over its ``streaming_split`` shard, with Lhotse's own pieces.

Rows are wrapped in a tiny example object (``id``, ``duration``, ``num_tokens``) so that Lhotse's
constraints (``TimeConstraint``, ``TokenConstraint``, ``FixedBucketBatchSizeConstraint``), its
``DynamicBucketer`` (bucketed) and ``DurationBatcher`` (not bucketed) do the grouping exactly as
they do for NeMo's dataloader; only the I/O around them is ours.

Mapping from the ``data:`` knobs:

* ``bucket_duration_bins`` + ``bucket_batch_size``: bins are upper bounds, one batch size per bin,
  longer rows are dropped (NeMo's ``FixedBucketBatchSizeConstraint`` + ``BucketingFilter``).
* ``use_bucketing`` with ``batch_duration`` / ``batch_tokens``: bins are boundaries
  (``len(bins) + 1`` buckets) and every batch fills the budget; ``quadratic_duration`` /
  ``quadratic_factor`` penalise long examples.
* token mode (``use_multimodal_sampling``): lengths are NeMo's LLM positions
  (``salm.data.lengths.example_length``) and bins are in tokens.

Every rank seeds the bucket choice identically (Lhotse's ``sync_buckets``), so ranks draw batches
of similar length at the same step.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from lhotse.dataset.sampling.base import SamplingConstraint, TimeConstraint, TokenConstraint
from lhotse.dataset.sampling.dynamic import DurationBatcher
from lhotse.dataset.sampling.dynamic_bucketing import (
    DynamicBucketer,
    FixedBucketBatchSizeConstraint,
    estimate_duration_buckets,
)

from salm.data.collate import collate_rows, padding_ratio
from salm.data.config import DataConfig
from salm.data.lengths import example_length

logger = logging.getLogger("salm.data")

NUM_ROWS_FOR_BINS_ESTIMATE = 2000


@dataclass
class Example:
    """What Lhotse's samplers see of a row."""

    id: str
    duration: float
    num_tokens: int
    row: dict


class TokenBucketBatchSizeConstraint(FixedBucketBatchSizeConstraint):
    """Per-bucket batch sizes with bins in tokens (NeMo's multimodal 1D variant)."""

    def measure_length(self, example: Example) -> float:
        return example.num_tokens


def measure(row: dict, cfg: DataConfig) -> int:
    """A row's length in LLM positions (audio as ``ceil(duration / ted)``), or its text tokens."""
    if cfg.token_equivalent_duration is None:
        return len(row["input_ids"])
    return example_length(
        len(row["input_ids"]),
        int(np.count_nonzero(row["loss_mask"])),
        float(row["duration"]),
        cfg.token_equivalent_duration,
        cfg.measure_total_length,
    )


def make_constraint(cfg: DataConfig) -> SamplingConstraint:
    """The Lhotse constraint that decides when a batch is full (and, for bins, its bucket)."""
    if cfg.bucket_batch_size is not None:
        kind = TokenBucketBatchSizeConstraint if cfg.token_mode else FixedBucketBatchSizeConstraint
        return kind(
            max_seq_len_buckets=list(cfg.bucket_duration_bins), batch_sizes=list(cfg.bucket_batch_size)
        )
    if cfg.token_mode:
        return TokenConstraint(
            max_tokens=cfg.batch_tokens, max_examples=cfg.batch_size, quadratic_length=cfg.quadratic_factor
        )
    return TimeConstraint(
        max_duration=cfg.batch_duration, max_cuts=cfg.batch_size, quadratic_duration=cfg.quadratic_duration
    )


def provisional_bins(cfg: DataConfig) -> list[float] | None:
    """NeMo's fallback when no bins are given: evenly spaced up to ``max_duration`` (seconds only)."""
    if cfg.bucket_duration_bins is not None:
        return list(cfg.bucket_duration_bins)
    if not cfg.token_mode and cfg.max_duration is not None:
        begin = cfg.min_duration if cfg.min_duration and cfg.min_duration > 0 else 0.0
        return np.linspace(begin, cfg.max_duration, cfg.num_buckets + 1)[1:-1].tolist()
    return None


class _ReadStats:
    """Counts what arrives from Ray Data, for the per-step metrics."""

    def __init__(self) -> None:
        self.rows = 0
        self.audio_seconds = 0.0
        self.skipped = 0
        self.filtered = 0
        self.started: float | None = None

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - (self.started or time.perf_counter()), 1e-9)
        return self.rows / elapsed, self.audio_seconds / elapsed


def _examples(rows: Iterable[dict], cfg: DataConfig, stats: _ReadStats) -> Iterator[Example]:
    for row in rows:
        if stats.started is None:
            stats.started = time.perf_counter()
        stats.skipped += int(row.get("skipped", 0))
        stats.filtered += int(row.get("filtered", 0))
        if not row["id"]:
            continue  # a row that only carries counts
        stats.rows += 1
        stats.audio_seconds += float(row["duration"])
        yield Example(str(row["id"]), float(row["duration"]), measure(row, cfg), row)


def _fits_last_bin(examples: Iterator[Example], constraint, stats: _ReadStats) -> Iterator[Example]:
    buckets = constraint.max_seq_len_buckets
    for example in examples:
        if constraint.select_bucket(buckets, example) < len(buckets):
            yield example
        else:
            stats.filtered += 1


def _estimated_bins(
    examples: Iterator[Example], cfg: DataConfig, constraint
) -> tuple[list[float], Iterator[Example]]:
    head = list(itertools.islice(examples, NUM_ROWS_FOR_BINS_ESTIMATE))
    num_buckets = min(cfg.num_buckets, max(2, len(head)))
    bins = estimate_duration_buckets(head, num_buckets=num_buckets, constraint=constraint) if head else []
    logger.warning(
        "no `data.bucket_duration_bins`: estimated %d bins from the first %d rows of this worker; "
        "run `salm data estimate-bins` and set them so every rank buckets alike",
        len(bins),
        len(head),
    )
    return bins, itertools.chain(head, examples)


def iterate_batches(rows: Iterable[dict], cfg: DataConfig, pad_id: int) -> Iterator[dict]:
    """Group ``rows`` (one rank's stream) into collated batches; see ``collate_rows`` for the keys.

    Each batch also has ``metrics``: ``batch_size``, ``audio_seconds``, ``text_tokens``,
    ``llm_positions``, ``padding_ratio`` (audio samples), ``padding_ratio_tokens``,
    ``read_rows_per_s``, ``read_audio_s_per_s`` (since the first row), and running totals
    ``skipped_total`` (bad data) and ``filtered_total`` (outside the limits).
    Ends when ``rows`` ends: an infinite dataset gives an infinite iterator.
    """
    stats = _ReadStats()
    constraint = make_constraint(cfg)
    examples: Iterator[Example] = _examples(rows, cfg, stats)
    if cfg.bucket_batch_size is not None:
        examples = _fits_last_bin(examples, constraint, stats)
    if cfg.use_bucketing:
        bins = provisional_bins(cfg)
        if bins is None:
            bins, examples = _estimated_bins(examples, cfg, constraint)
        batcher = DynamicBucketer(
            examples,
            duration_bins=bins,
            world_size=1,
            constraint=constraint,
            drop_last=cfg.drop_last,
            buffer_size=cfg.bucket_buffer_size,
            shuffle=cfg.shuffle,
            rng=random.Random(cfg.seed),
            bucket_rng=random.Random(cfg.seed),  # the same on every rank: similar buckets per step
        )
    else:
        batcher = DurationBatcher(examples, constraint=constraint, drop_last=cfg.drop_last)
    for group in batcher:
        batch_examples = list(group)
        batch = collate_rows([example.row for example in batch_examples], pad_id)
        rows_per_s, audio_per_s = stats.rates()
        token_lengths = [len(example.row["input_ids"]) for example in batch_examples]
        batch["metrics"] = {
            "batch_size": len(batch_examples),
            "audio_seconds": float(sum(batch["durations"])),
            "text_tokens": int(sum(token_lengths)),
            "llm_positions": int(sum(example.num_tokens for example in batch_examples)),
            "padding_ratio": padding_ratio(batch["audio_lens"]),
            "padding_ratio_tokens": padding_ratio(token_lengths),
            "read_rows_per_s": rows_per_s,
            "read_audio_s_per_s": audio_per_s,
            "skipped_total": stats.skipped,
            "filtered_total": stats.filtered,
        }
        yield batch
