"""The training loop's batch feed: prefetched in a thread, in order, errors raised in the loop, pinned on GPUs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from salm.train.batch_device import prefetch_pinned, to_device

CPU = torch.device("cpu")


def batch(index: int) -> dict:
    return {
        "audios": torch.full((2, 3), float(index)),
        "audio_lens": torch.tensor([3, 2]),
        "ids": [f"cut-{index}"],
    }


def wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "salm-batch-prefetch"]


def test_every_batch_arrives_in_order_and_a_finite_source_ends() -> None:
    got = list(prefetch_pinned((batch(i) for i in range(7)), CPU))
    assert [b["ids"] for b in got] == [[f"cut-{i}"] for i in range(7)]
    for i, b in enumerate(got):
        assert torch.equal(b["audios"], batch(i)["audios"]) and torch.equal(
            b["audio_lens"], batch(i)["audio_lens"]
        )
    assert wait_until(lambda: not prefetch_threads())


def test_the_source_runs_ahead_of_the_consumer_by_the_depth() -> None:
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield batch(i)

    feed = prefetch_pinned(source(), CPU, depth=2)
    first = next(feed)
    assert first["ids"] == ["cut-0"]
    # While the step works on batch 0, the thread collates the next ones: 2 waiting + 1 blocked on a slot.
    assert wait_until(lambda: len(pulled) == 4)
    time.sleep(0.2)
    assert len(pulled) == 4, "the thread must not run further ahead than its depth"
    feed.close()
    assert wait_until(lambda: not prefetch_threads()), "closing the feed stops its thread"
    assert len(pulled) <= 5


def test_an_error_in_the_source_is_raised_in_the_loop_after_the_batches_before_it() -> None:
    def source():
        yield batch(0)
        yield batch(1)
        raise ValueError("shard 3 is truncated: re-run salm-data prepare")

    feed = prefetch_pinned(source(), CPU)
    assert next(feed)["ids"] == ["cut-0"]
    assert next(feed)["ids"] == ["cut-1"]
    with pytest.raises(ValueError, match="shard 3 is truncated"):
        next(feed)


def test_depth_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(prefetch_pinned(iter([batch(0)]), CPU, depth=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_on_a_gpu_batches_arrive_pinned_and_copy_to_the_device() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    got = list(prefetch_pinned((batch(i) for i in range(3)), device))
    assert all(b["audios"].is_pinned() and b["audio_lens"].is_pinned() for b in got)
    on_device = to_device(got[2], device)
    assert on_device["audios"].device == device and on_device["ids"] == ["cut-2"]
    assert torch.equal(on_device["audios"].cpu(), batch(2)["audios"])
