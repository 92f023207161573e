"""Dropout inside compiled layers drawn by PyTorch's own dropout kernel, not by Inductor's Triton RNG.

Why: Inductor lowers ``dropout`` into its fused Triton kernels with ``tl.rand``, one Philox-4x32-10
evaluation per element of which three of the four outputs are thrown away (pytorch#120423, fixed
after torch 2.11). At canary shapes that makes the fused kernels compute-bound on random numbers:
the Conformer feed-forward's ``silu + dropout`` kernel took ~127 us per call for ~36 us of memory
traffic on an H200 (BENCHMARKS.md). PyTorch's eager ``native_dropout`` uses each Philox draw for
four elements. Every ``nn.Dropout`` of a compiled layer becomes ``EagerKernelDropout``, whose mask
comes from ``salm::native_dropout``, a custom op that Inductor calls as it is instead of lowering;
its backward (mask x scale) stays an ordinary op that Inductor fuses with its neighbours.

Same module, no parameters, the eager model's masks for the same seed (tested on the CPU; a
GPU-only test checks it with the C++ wrapper, run on an H200 before its last change); only a
compiled layer's fusion around each dropout changes (one more read and write of the tensor).
Not for checkpointed layers: see ``salm.model.activation_checkpointing``.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("salm::native_dropout", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def native_dropout(x: torch.Tensor, p: float, draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * mask / (1 - p), mask)`` with PyTorch's dropout kernel (``torch.native_dropout``, training).

    ``draw`` is not used in the computation. It numbers the dropouts of a layer, so that two of them
    on one tensor (PEFT's ``lora_dropout`` of q_proj and of v_proj both take the normed hidden states)
    are two calls to the compiler: AOTAutograd's common-subexpression elimination knows ATen's random
    ops by name only, and merged two identical calls to this op into one mask (tested).
    """
    output, mask = torch.native_dropout(x, p, True)
    return output, mask


@native_dropout.register_fake
def _native_dropout_fake(x: torch.Tensor, p: float, draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _save_mask(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
    ctx.scale = 1.0 / (1.0 - inputs[1])
    ctx.save_for_backward(output[1])


def _native_dropout_backward(ctx, grad_output: torch.Tensor, _grad_mask: torch.Tensor | None):  # noqa: ANN001, ANN202
    (mask,) = ctx.saved_tensors
    return torch.ops.aten.native_dropout_backward(grad_output, mask, ctx.scale), None, None


native_dropout.register_autograd(_native_dropout_backward, setup_context=_save_mask)


class EagerKernelDropout(nn.Dropout):
    """``nn.Dropout`` whose training-mode mask comes from ``salm::native_dropout`` (see the module doc)."""

    draw = 0  # this dropout's number in its layer (use_eager_kernel_dropout), see native_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:  # native_dropout's scale would be 1 / 0
            return torch.zeros_like(x)
        return self.drop(x)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with a fresh mask applied, for ``0 < p < 1`` in training mode."""
        return native_dropout(x, self.p, self.draw)[0]


class AtenKernelDropout(EagerKernelDropout):
    """``EagerKernelDropout`` whose mask comes from ATen's ``torch.native_dropout`` called directly
    (eval mode, ``p`` of 0 and 1 as there). Not in the recipe: a candidate to replace the custom op.

    Compiled with Inductor's ``fallback_random``, ``aten.native_dropout`` is not decomposed into
    Triton RNG but called as ATen's kernel from the layer's wrapper (generated C++ with
    ``cpp_wrapper``): the same kernel and masks as ``salm::native_dropout`` without the Python
    custom op's dispatch, which the H200 profile put at ~81 us of host time per call, 1,400 calls
    per pass (BENCHMARKS.md, "Dropout without the Python custom op"). Without ``fallback_random``
    Inductor lowers it to its own RNG, as for a plain ``nn.Dropout``. It calls the op directly, not
    ``F.dropout``, because on the CPU ``F.dropout`` takes another path (``bernoulli_``) and the tests
    and ``bench/dropout_host_cost.py`` must compile what a GPU compiles. AOTAutograd's
    common-subexpression elimination knows ATen's random ops, so two of them on one tensor keep two
    masks without ``EagerKernelDropout.draw``, which this class leaves unused (tested).
    """

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, True)[0]


def use_eager_kernel_dropout(layers: list[nn.Module]) -> int:
    """Give every plain ``nn.Dropout`` inside ``layers`` the eager kernel; returns how many changed.

    In-place dropouts are left alone: the custom op returns a new tensor, and a caller of an
    in-place one may rely on its input being overwritten.
    """
    changed = 0
    for layer in layers:
        draws = 0  # numbered per layer: every layer of a kind numbers alike, so they share compiled code
        for module in layer.modules():
            if type(module) is nn.Dropout and not module.inplace:
                module.__class__ = EagerKernelDropout
                changed += 1
            if type(module) is EagerKernelDropout:
                module.draw, draws = draws, draws + 1
    return changed
