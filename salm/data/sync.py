"""Ranks stop together on finite data: an all-reduced "I still have a batch" flag per step.

``streaming_split(equal=True)`` gives every rank the same number of rows, but bucketing can turn
them into different numbers of batches; a rank that stops early would leave the others blocked in
a collective. Infinite training streams do not need this (``max_steps`` bounds every rank).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def stop_together(batches: Iterable[dict], *, pad_with_none: bool = False) -> Iterator[dict | None]:
    """Yield batches while every rank has one (``pad_with_none=False``: drops the longer ranks' tail).

    With ``pad_with_none=True`` exhausted ranks yield ``None`` until all are exhausted, so
    evaluation sees every row; the caller must still join each step's collectives (e.g. a forward
    on a dummy batch under ZeRO-3). Without an initialised process group it passes batches through.
    """
    iterator = iter(batches)
    if not (dist.is_available() and dist.is_initialized()):
        yield from iterator
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    while True:
        batch = next(iterator, None)
        flag = torch.tensor([1 if batch is not None else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX if pad_with_none else dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return
        yield batch
