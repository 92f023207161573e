"""Bucketing in the train worker: bucket assignment, batch sizes, token-mode lengths, collation."""

import bisect
import math
import random

import numpy as np
import pytest
import torch

from salm.data.bucketing import iterate_batches, measure
from salm.data.collate import collate_rows
from salm.data.config import DataConfig
from salm.data.lengths import example_length
from salm.data.sync import stop_together

RATE = 1000  # samples per second: small arrays, same logic as 16 kHz
PAD = 151643


def make_rows(count: int, seed: int = 0, low: float = 0.5, high: float = 6.5) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        duration = round(rng.uniform(low, high), 3)
        num_ids = rng.randint(12, 30)
        answer = rng.randint(3, num_ids - 5)
        rows.append(
            {
                "id": f"cut-{index}",
                "audio": np.full(int(duration * RATE), 0.1, dtype=np.float32),
                "duration": duration,
                "text": f"text {index}",
                "input_ids": np.arange(num_ids, dtype=np.int64),
                "loss_mask": np.array([False] * (num_ids - answer) + [True] * answer),
                "skipped": 0,
                "filtered": 0,
            }
        )
    return rows


def config(**overrides) -> DataConfig:
    return DataConfig(shar_path="unused", sample_rate=RATE, **overrides)


def test_rows_land_in_their_duration_bucket_with_that_buckets_batch_size() -> None:
    bins, sizes = [2.0, 4.0, 6.0], [8, 4, 2]
    rows = make_rows(300)
    cfg = config(bucket_duration_bins=bins, bucket_batch_size=sizes, bucket_buffer_size=100, drop_last=True)
    batches = list(iterate_batches(rows, cfg, PAD))
    assert batches
    seen = 0
    for batch in batches:
        buckets = {bisect.bisect_left(bins, d) for d in batch["durations"]}
        assert len(buckets) == 1, f"one batch mixes buckets {buckets}"
        assert len(batch["ids"]) == sizes[buckets.pop()]  # drop_last: every batch is full
        seen += len(batch["ids"])
    too_long = sum(r["duration"] > bins[-1] for r in rows)
    assert too_long > 0 and batches[-1]["metrics"]["filtered_total"] == too_long
    assert seen <= len(rows) - too_long


def test_bucketing_with_a_seconds_budget_cuts_padding() -> None:
    rows = make_rows(300, seed=1)
    plain = list(iterate_batches(rows, config(batch_duration=20.0), PAD))
    bucketed = list(
        iterate_batches(
            rows, config(batch_duration=20.0, use_bucketing=True, num_buckets=6, max_duration=6.5), PAD
        )
    )

    def padding(batches):
        return np.mean([b["metrics"]["padding_ratio"] for b in batches])

    assert sum(len(b["ids"]) for b in plain) == sum(len(b["ids"]) for b in bucketed) == 300
    assert padding(bucketed) < 0.10 < padding(plain)
    for batch in bucketed:
        assert sum(batch["durations"]) <= 20.0 + max(batch["durations"])


def test_token_mode_length_is_nemos_audio_plus_text_positions() -> None:
    row = make_rows(1)[0]
    row["duration"], row["input_ids"] = 2.01, np.arange(25)
    row["loss_mask"] = np.array([False] * 15 + [True] * 10)
    # ceil(2.01 / 0.08) = 26 audio positions replace the single placeholder token.
    total = config(use_multimodal_sampling=True, batch_tokens=500, token_equivalent_duration=0.08)
    context = config(
        use_multimodal_sampling=True,
        batch_tokens=500,
        token_equivalent_duration=0.08,
        measure_total_length=False,
    )
    assert measure(row, total) == 25 - 1 + 26 == example_length(25, 10, 2.01, 0.08, True)
    assert measure(row, context) == 15 - 1 + 26


def test_token_mode_batches_respect_the_token_budget_and_token_bins() -> None:
    rows = make_rows(200, seed=2)
    cfg = config(
        use_multimodal_sampling=True,
        token_equivalent_duration=0.08,
        batch_tokens=600,
        use_bucketing=True,
        bucket_duration_bins=[30.0, 50.0, 70.0],
    )
    batches = list(iterate_batches(rows, cfg, PAD))
    assert sum(len(b["ids"]) for b in batches) == 200
    for batch in batches:
        lengths = [
            len(r["input_ids"]) - 1 + math.ceil(r["duration"] / 0.08) for r in rows if r["id"] in batch["ids"]
        ]
        assert batch["metrics"]["llm_positions"] == sum(lengths)
        assert sum(lengths) <= 600 + max(lengths)
        assert len({bisect.bisect_left([30.0, 50.0, 70.0], n) for n in lengths}) == 1


def test_seeded_bucketing_is_reproducible() -> None:
    rows = make_rows(150, seed=3)
    knobs = {
        "batch_duration": 15.0,
        "use_bucketing": True,
        "num_buckets": 4,
        "max_duration": 6.5,
        "shuffle": True,
    }
    first = [b["ids"] for b in iterate_batches(rows, config(seed=7, **knobs), PAD)]
    again = [b["ids"] for b in iterate_batches(rows, config(seed=7, **knobs), PAD)]
    other = [b["ids"] for b in iterate_batches(rows, config(seed=8, **knobs), PAD)]
    assert first == again and first != other


def test_count_only_rows_are_dropped_but_counted() -> None:
    rows = make_rows(5)
    rows[2]["skipped"] = 3
    rows.append({**rows[0], "id": "", "audio": np.zeros(0, np.float32), "skipped": 2, "filtered": 4})
    batches = list(iterate_batches(rows, config(batch_size=10), PAD))
    assert len(batches) == 1 and len(batches[0]["ids"]) == 5
    # Counts reported with a batch cover what arrived before it was cut.
    assert batches[0]["metrics"]["skipped_total"] in (3, 5)


def test_collate_right_pads_audio_and_left_pads_tokens() -> None:
    rows = make_rows(3)
    batch = collate_rows(rows, PAD)
    lengths = [len(r["input_ids"]) for r in rows]
    width = max(lengths)
    assert batch["audios"].dtype == torch.float32 and batch["audios"].shape[0] == 3
    assert batch["audio_lens"].tolist() == [len(r["audio"]) for r in rows]
    for index, row in enumerate(rows):
        pad = width - lengths[index]
        assert batch["input_ids"][index, :pad].eq(PAD).all()
        assert batch["input_ids"][index, pad:].tolist() == row["input_ids"].tolist()
        assert not batch["loss_mask"][index, :pad].any()
        assert batch["loss_mask"][index, pad:].tolist() == row["loss_mask"].tolist()
        assert batch["audios"][index, len(row["audio"]) :].eq(0).all()


def test_stop_together_passes_batches_through_without_a_process_group() -> None:
    assert list(stop_together(iter([{"a": 1}, {"a": 2}]))) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_row_is_batched_at_most_once(drop_last: bool) -> None:
    rows = make_rows(120, seed=4)
    cfg = config(
        batch_duration=12.0, use_bucketing=True, num_buckets=5, max_duration=6.5, drop_last=drop_last
    )
    ids = [i for b in iterate_batches(rows, cfg, PAD) for i in b["ids"]]
    assert len(ids) == len(set(ids))
    assert drop_last or len(ids) == 120
