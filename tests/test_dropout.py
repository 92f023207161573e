"""Dropout in compiled layers drawn by ATen's kernel (``salm.model.dropout``): eager's masks, eager's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from salm.model.compile import compile_layers, repeated_layers
from salm.model.dropout import EagerKernelDropout, use_eager_kernel_dropout


class FeedForward(nn.Module):
    """The Conformer feed-forward's shape: linear, Swish, dropout, linear, dropout, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        self.inner, self.outer = nn.Dropout(0.3), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(self.down(self.inner(nn.functional.silu(self.up(x)))))


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_a_compiled_layer_draws_eagers_dropout_masks_and_gradients(device: str) -> None:
    """Inductor's own dropout draws other masks for the same seed; the recipe's compiled layers draw eager's.

    On the GPU with the canary recipe's C++ wrapper, which calls ATen's kernel from generated C++.
    """
    torch.manual_seed(0)
    eager = FeedForward().train().to(device)
    compiled = copy.deepcopy(eager)
    assert compile_layers([compiled], {"cpp_wrapper": True} if device == "cuda" else {}) == 1
    assert type(compiled.inner) is EagerKernelDropout and type(compiled.outer) is EagerKernelDropout
    for frames in (5, 9):  # a second shape: the dynamic graph, not a recompile, must hold it
        x = torch.randn(3, frames, 8, device=device, requires_grad=True)
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            x.grad = None
            torch.manual_seed(frames)
            out = model(x)
            out.square().mean().backward()
            results.append((out, x.grad, [p.grad for p in model.parameters()]))
        (eager_out, eager_dx, eager_grads), (our_out, our_dx, our_grads) = results
        # The outer dropout's zeros leave exactly the residual x: the same elements dropped. The values
        # (on CUDA not bitwise: Inductor fuses the linear layers' epilogues) show the inner mask too.
        assert torch.equal(our_out == x, eager_out == x)
        assert (eager_out == x).any()  # dropout did drop something
        torch.testing.assert_close(our_out, eager_out)
        torch.testing.assert_close(our_dx, eager_dx)
        for mine, reference in zip(our_grads, eager_grads, strict=True):
            torch.testing.assert_close(mine, reference)


class TwoAdapters(nn.Module):
    """PEFT's LoRA on q_proj and v_proj: two dropouts of the same input."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Dropout(0.5), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q(x), self.v(x)


def test_two_dropouts_of_one_tensor_draw_two_masks_when_compiled() -> None:
    """AOTAutograd's common-subexpression elimination merges identical calls of an op it does not know
    to be random (it did with the earlier custom op); ATen's random ops it knows, and leaves alone."""
    eager = TwoAdapters().train()
    compiled = copy.deepcopy(eager)
    compile_layers([compiled])
    assert type(compiled.q) is EagerKernelDropout and type(compiled.v) is EagerKernelDropout
    x = torch.randn(16, 64)
    torch.manual_seed(0)
    eager_q, eager_v = eager(x)
    torch.manual_seed(0)
    q, v = compiled(x)
    assert not torch.equal(q == 0, v == 0)
    assert torch.equal(q, eager_q) and torch.equal(v, eager_v)


@pytest.mark.parametrize("fallback_random", [True, False])
def test_the_compiled_code_calls_atens_dropout_kernel_and_draws_no_random_numbers_of_its_own(
    fallback_random: bool,
) -> None:
    """The recipe's layer calls ATen's kernel from the C++ wrapper itself: no Python per call, and no
    Inductor RNG (``rand``), which draws other masks than eager's. Without ``fallback_random`` (a user's
    ``trainer.compile_options`` may turn it off) Inductor lowers the op to its own RNG."""
    from torch._inductor.utils import run_and_get_code

    layer = FeedForward().train()
    compile_layers([layer], {"fallback_random": fallback_random, "cpp_wrapper": True})
    _, (forward_code, *_) = run_and_get_code(layer, torch.randn(3, 5, 8))
    calls_aten = "aoti_torch_cpu_native_dropout(" in forward_code
    # Inductor's own RNG: seeds drawn by randint, then rand in its kernels
    own_rng = "randint" in forward_code or "normalized_rand" in forward_code
    assert (calls_aten, own_rng) == (fallback_random, not fallback_random)


def test_eval_mode_zero_and_one_probabilities_and_in_place_dropouts() -> None:
    x = torch.randn(4, 8)
    dropout = EagerKernelDropout(0.5)
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(EagerKernelDropout(0.0).train()(x), x)
    assert torch.equal(EagerKernelDropout(1.0).train()(x), torch.zeros_like(x))
    layer = nn.Sequential(nn.Dropout(0.1), nn.Dropout(0.1, inplace=True))
    assert use_eager_kernel_dropout([layer]) == 1
    assert type(layer[0]) is EagerKernelDropout and type(layer[1]) is nn.Dropout


def test_the_salms_compiled_layers_use_the_eager_kernel(tiny_salm) -> None:
    model = copy.deepcopy(tiny_salm)
    dropouts = [m for layer in repeated_layers(model) for m in layer.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and not any(type(m) is EagerKernelDropout for m in dropouts)  # eager: PyTorch's own
    compile_layers(repeated_layers(model))
    assert all(type(m) is EagerKernelDropout for m in dropouts if not m.inplace)
