"""DeepSpeed ZeRO-1/2's gradient clipping: the norm in a few fused kernels, the clip without a host sync.

DeepSpeed 0.19's ``DeepSpeedZeroOptimizer.get_grad_norm_direct`` loops over the gradient
tensors in Python: per tensor a copy to fp64 and a ``vector_norm``. The canary shape has 1,310
trainable tensors, so every optimizer step launches ~2,600 small kernels one at a time. Profiled
on an H200 (``bench/train_throughput.py --profile``, BENCHMARKS.md), the GPU sat idle 0.41 s per
pass of 5 steps waiting for those launches: 76% of its idle time in the optimizer phase.

``use_fused_gradient_clipping`` swaps that method, on one optimizer, for the same sum over the same
tensors through ``torch._foreach_norm`` (fp32 per tensor, summed in fp64): a handful of launches
per step. It keeps DeepSpeed's reductions across data- and model-parallel ranks and its
NaN/inf -> -1 masking. Cases it does not cover (other norms, model- or pipeline-parallel
parameters) go to DeepSpeed's own loop.

It also swaps ``unscale_and_clip_grads``, which turns a NaN/inf norm (DeepSpeed's -1 sentinel) into
"clip by infinity" after reading it with ``bool()``: on a GPU the host waits there for the whole
backward and the norm to finish, at every step. The same choice made with ``masked_fill`` on the
device gives the same numbers and lets the host queue the optimizer's kernels at once. The norm's
own NaN/inf -> -1 masking is done with a Python fill value, not DeepSpeed's helper, which builds its
-1 with ``torch.tensor(..., device=...)``: a blocking host-to-device copy at every step
(``bench/host_syncs.py`` counts the step's syncs; ``tests/test_host_syncs.py`` holds it at none).
"""

from __future__ import annotations

import types

import torch


def _foreach_grad_norm_direct(self, gradients: list, params: list, norm_type: float = 2) -> torch.Tensor:
    """``get_grad_norm_direct`` for the L2 norm of gradients owned by data-parallel ranks only."""
    from deepspeed import comm as dist

    if float(norm_type) != 2.0 or self.model_parallel_rank != 0 or self.salm_has_replicated_params:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    # As DeepSpeed: padding added by ZeRO's partitioning is not a gradient; zip pairs with params.
    real = (g for g in gradients if not getattr(g, "_zero_padding", False))
    grads = [g.detach() for g, _ in zip(real, params, strict=False)]
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        total = torch.stack(norms).double().pow(2).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    # DeepSpeed's NaN/inf -> -1 masking (``mask_nan_or_inf_with_val_inplace``) fills from
    # ``torch.tensor(-1.0, device=...)``: on CUDA a blocking copy from pageable memory at every step.
    # A Python fill value is a kernel argument instead.
    return total.masked_fill_(~torch.isfinite(total), -1.0)


def _clip_on_device(self, grad_groups_flat: list, total_norm) -> None:
    """DeepSpeed's ``unscale_and_clip_grads`` with its invalid-norm check kept on the device."""
    if not torch.is_tensor(total_norm):  # a host number: DeepSpeed's check reads no device value
        type(self).unscale_and_clip_grads(self, grad_groups_flat, total_norm)
        return
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        invalid = ~torch.isfinite(total_norm) | (total_norm < 0)  # NaN/inf, or DeepSpeed's -1 for them
        clip_norm = total_norm.masked_fill(invalid, float("inf"))  # as DeepSpeed: clip by infinity
        clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for part in grad if isinstance(grad, list) else [grad]:
            part.data.mul_(1.0 / combined_scale)


def use_fused_gradient_clipping(optimizer) -> bool:
    """Replace ``optimizer``'s per-tensor gradient norm loop and its syncing clip (DeepSpeed ZeRO-1/2 only).

    Returns whether it did: False for other optimizers (ZeRO-3, or no DeepSpeed ZeRO) and for a
    DeepSpeed without the method, which keep their own norm.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not hasattr(optimizer, "get_grad_norm_direct"):
        return False
    params = [p for group in optimizer.params_in_partition for p in group]
    optimizer.salm_has_replicated_params = any(getattr(p, "ds_pipe_replicated", False) for p in params)
    optimizer.get_grad_norm_direct = types.MethodType(_foreach_grad_norm_direct, optimizer)
    optimizer.unscale_and_clip_grads = types.MethodType(_clip_on_device, optimizer)
    return True


def use_deepspeed_gradient_clipping(optimizer) -> None:
    """Undo ``use_fused_gradient_clipping``: DeepSpeed's own norm loop and clip again (for before/after
    measurements)."""
    for name in ("get_grad_norm_direct", "unscale_and_clip_grads"):
        vars(optimizer).pop(name, None)  # the instance's methods; the class keeps DeepSpeed's
