"""Dropout inside compiled layers drawn by PyTorch's own dropout kernel, not by Inductor's Triton RNG.

Why: Inductor lowers ``dropout`` into its fused Triton kernels with ``tl.rand``, one Philox-4x32-10
evaluation per element of which three of the four outputs are thrown away (pytorch#120423, fixed
after torch 2.11). At canary shapes that makes the fused kernels compute-bound on random numbers:
the Conformer feed-forward's ``silu + dropout`` kernel took ~127 us per call for ~36 us of memory
traffic on an H200 (BENCHMARKS.md). PyTorch's eager ``native_dropout`` uses each Philox draw for
four elements.

How: every ``nn.Dropout`` of a compiled layer becomes ``EagerKernelDropout``, which calls
``torch.native_dropout`` itself, and ``salm.model.compile`` compiles with Inductor's
``fallback_random``, under which Inductor keeps ``aten.native_dropout`` whole and calls ATen's kernel
from the layer's generated wrapper (C++ with the recipe's ``cpp_wrapper``); its backward (mask x
scale) stays an ordinary op that Inductor fuses with its neighbours. Until 2026-12-05 the mask came
from a ``torch.library`` custom op with a Python body, which the generated C++ entered through the
dispatcher at every call: on an H200 ATen's call was 37 us less host time per dropout (1,400 per
pass) and the recipe's step 1.858 -> 1.751 s per pass (BENCHMARKS.md, "Dropout through ATen's kernel").
It calls the op directly, not ``F.dropout``, because on the CPU ``F.dropout`` takes another path
(``bernoulli_``) and the tests must compile what a GPU compiles.

Same module, no parameters, the eager model's masks for the same seed, also for two dropouts of one
tensor (PEFT's ``lora_dropout`` of q_proj and of v_proj: AOTAutograd's common-subexpression
elimination knows ATen's random ops and keeps both), in checkpointed layers too (the checkpoint
restores the RNG state before the recompute). ``tests/test_dropout.py`` checks it on the CPU and, with
the C++ wrapper and the per-compile option, on an H100 (2026-12-05).
"""

from __future__ import annotations

import torch
from torch import nn


class EagerKernelDropout(nn.Dropout):
    """``nn.Dropout`` whose training-mode mask comes from ``torch.native_dropout`` (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:  # native_dropout's scale would be 1 / 0
            return torch.zeros_like(x)
        return torch.native_dropout(x, self.p, True)[0]


def use_eager_kernel_dropout(layers: list[nn.Module]) -> int:
    """Give every plain ``nn.Dropout`` inside ``layers`` the eager kernel; returns how many changed.

    In-place dropouts are left alone: ``native_dropout`` returns a new tensor, and a caller of an
    in-place one may rely on its input being overwritten.
    """
    changed = 0
    for layer in layers:
        for module in layer.modules():
            if type(module) is nn.Dropout and not module.inplace:
                module.__class__ = EagerKernelDropout
                changed += 1
    return changed
