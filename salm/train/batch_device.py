"""Moving a collated batch (tensors, its host-planned ``BatchLayout``, id/text lists) to the training device.

``with_layouts`` plans each batch's LLM rows on the host (``salm.model.batch_layout``), so the step's
forward never waits for the GPU to size a gather; the loop runs it inside ``prefetch_pinned``.
``prefetch_pinned`` runs the batch source (bucketing, collation) one or two batches ahead in a
background thread and copies each batch's tensors to pinned (page-locked) host memory there, so
``to_device``'s copy is asynchronous: from pageable memory CUDA first waits for the stream to drain.
Measured on an H200 (BENCHMARKS.md, "Channels-last subsampling ...; pinned batches"): the copies took
57 instead of 77 ms of GPU time per training pass, the wall level; the benchmark's batches are made
in advance, so the collation moved off the step's thread is not in that figure.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import torch

from salm.model.batch_layout import BatchLayout
from salm.model.salm import SALM

MOVABLE = (torch.Tensor, BatchLayout)  # what goes to the device with a batch


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors and the layout go to ``device`` (non-blocking from pinned memory); lists stay on the host."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, MOVABLE) else v for k, v in batch.items()}


def pin_batch(batch: dict) -> dict:
    """The batch with every tensor in pinned host memory (needs CUDA); other values as they are."""
    return {k: v.pin_memory() if isinstance(v, MOVABLE) else v for k, v in batch.items()}


def with_layouts(batches: Iterable[dict], model: SALM) -> Iterator[dict]:
    """``batches``, each with its host-side ``layout`` (``salm.model.batch_layout``) when the model
    can predict its frame counts. Run inside ``prefetch_pinned``, the work stays off the step's path."""
    for batch in batches:
        layout = model.batch_layout(batch)
        yield batch if layout is None else {**batch, "layout": layout}


def prefetch_pinned(batches: Iterable[dict], device: torch.device, depth: int = 2) -> Iterator[dict]:
    """``batches`` in their order, produced up to ``depth`` ahead by a background thread; pinned for a CUDA ``device``.

    The source's own work (reading rows, bucketing, collating) overlaps the training step instead of
    running between steps. An error in the source is raised here, in the training loop, as itself;
    a finite source ends this iterator. Closing the iterator (or dropping it) stops the thread at
    its next batch.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        """Hand ``item`` over, waiting for a free slot; False once the consumer has gone."""
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    pin = device.type == "cuda"

    def produce() -> None:
        try:
            if pin and device.index is not None:  # the worker's GPU, not GPU 0: a context there costs memory
                torch.cuda.set_device(device)
            for batch in batches:
                if not put(("batch", pin_batch(batch) if pin else batch)):
                    return
            put(("end", None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(("error", error))

    thread = threading.Thread(target=produce, name="salm-batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
