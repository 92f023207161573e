"""DeepSpeed ZeRO-1/2 on one data-parallel rank: no gradient "all-reduce" over that one rank.

With ``contiguous_gradients: false`` (the canary recipe), DeepSpeed 0.19 reduces each bucket of
gradients in ``allreduce_and_copy``: it concatenates the bucket's gradients into one flat tensor,
casts it to the communication dtype, divides it by the world size, all-reduces it, and copies every
slice back into its gradient. On one rank all of that is the identity: the sum over one rank is the
tensor, the division is by 1, and bf16 -> fp32 -> bf16 round-trips exactly. It still costs the GPU
a pass over every gradient for the concatenation (CatArrayBatchedCopy, ~20 launches per step at the
canary shape), another for the division, and one copy kernel per trainable tensor (1,310 per step),
all launched by the host during the backward (BENCHMARKS.md, "Gradient reduction on one rank").

``skip_single_rank_reduction`` swaps that method, on one optimizer whose data-parallel group has one
rank, for one that only does what the reduction leaves behind for the step: when DeepSpeed keeps an
fp32 gradient partition (``data_types.grad_accum_dtype: fp32``), it adds the gradients into it. Any
call on a group of more than one rank, with sequence parallelism, or with ``overlap_comm`` (which
also clears gradients of the previous bucket in that method) goes to DeepSpeed's own method.
"""

from __future__ import annotations

import types

import torch


def _allreduce_and_copy_on_one_rank(
    self,
    small_bucket: list[torch.Tensor],
    communication_data_type: torch.dtype,
    rank: int | None = None,
    log=None,
    divide: bool = True,
    process_group=None,
    output_bucket: list[torch.Tensor | None] | None = None,
) -> None:
    """``allreduce_and_copy`` where the group has one rank: the reduced gradients are the gradients."""
    from deepspeed import comm as dist

    group = self.dp_process_group if process_group is None else process_group
    if dist.get_world_size(group=group) != 1 or self.sequence_parallel_size != 1 or self.overlap_comm:
        type(self).allreduce_and_copy(
            self, small_bucket, communication_data_type, rank, log, divide, process_group, output_bucket
        )
        return
    for grad, output in zip(small_bucket, output_bucket or [None] * len(small_bucket), strict=True):
        self._add_to_grad_partition_buffer(output, grad)  # a no-op without an fp32 partition


def skip_single_rank_reduction(optimizer) -> bool:
    """Replace ``optimizer``'s bucket reduction by the identity it is on one rank (DeepSpeed ZeRO-1/2).

    Returns whether it did: False for other optimizers (ZeRO-3, or no DeepSpeed ZeRO), for a
    DeepSpeed without the method, and for a data-parallel group of more than one rank.
    """
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not hasattr(optimizer, "allreduce_and_copy"):
        return False
    if dist.get_world_size(group=optimizer.dp_process_group) != 1:
        return False
    optimizer.allreduce_and_copy = types.MethodType(_allreduce_and_copy_on_one_rank, optimizer)
    return True


def use_deepspeed_reduction(optimizer) -> None:
    """Undo ``skip_single_rank_reduction``: DeepSpeed's own reduction again (for before/after measurements)."""
    vars(optimizer).pop("allreduce_and_copy", None)  # the instance's method; the class keeps DeepSpeed's
