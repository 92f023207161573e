"""Activation checkpointing (``trainer.activation_checkpointing``): less saved for the backward, the same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_model import _batch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from salm.errors import SALMConfigError
from salm.model.activation_checkpointing import (
    checkpoint_layers,
    checkpointed_parts,
    is_checkpointed,
    use_activation_checkpointing,
)
from salm.model.compile import compile_layers, encoder_layers, llm_layers
from salm.model.dropout import EagerKernelDropout


class ScaledDropout(nn.Module):
    """``dropout(x * w)``: d sum / dx = w * mask / (1 - p), readable from the output as out / x."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x * self.weight)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_recomputed_forward_draws_the_forwards_dropout_mask(compiled: bool) -> None:
    """The backward must use the mask the forward used: out / x is exactly the gradient of sum(out).

    Compiled, the checkpoint runs the compiled forward again from the forward's RNG state, and
    ``salm.model.dropout``'s kernel must draw the same mask there.
    """
    layer = ScaledDropout().train()
    assert checkpoint_layers([layer]) == 1 and is_checkpointed(layer)
    if compiled:
        compile_layers([layer])
        assert type(layer.dropout) is EagerKernelDropout
    for frames in (6, 11):
        x = torch.randn(4, frames, 8).abs().add(0.1).requires_grad_()
        torch.manual_seed(frames)
        out = layer(x)
        out.sum().backward()
        assert out.eq(0).any() and out.ne(0).any()
        torch.testing.assert_close(x.grad, out.detach() / x.detach())


class SelfAttention(nn.Module):
    """Causal self-attention through ``scaled_dot_product_attention``, which torch marks as a random operator."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.proj(x).unflatten(-1, (2, 4)).transpose(1, 2)
        return F.scaled_dot_product_attention(heads, heads, heads, is_causal=True).transpose(1, 2).flatten(2)


def test_a_checkpointed_attention_layer_compiles_under_the_canary_recipes_cpp_wrapper() -> None:
    """The canary recipe compiles with ``cpp_wrapper``; a checkpointed Qwen3 layer then failed at the first step.

    With the checkpoint inside the compiled region, Inductor replays the attention's random state in
    the recompute with an operator its C++ wrapper cannot call; ``compile_layers`` compiles what runs
    inside the checkpoint instead.
    """
    layer, eager = SelfAttention(), SelfAttention()
    eager.load_state_dict(layer.state_dict())
    checkpoint_layers([layer])
    compile_layers([layer], {"cpp_wrapper": True})
    x = torch.randn(2, 6, 8, requires_grad=True)
    layer(x).sum().backward()
    compiled_grad, x.grad = x.grad, None
    eager(x).sum().backward()
    torch.testing.assert_close(compiled_grad, x.grad)


def test_a_compiled_layer_cannot_be_checkpointed_afterwards() -> None:
    layer = ScaledDropout()
    compile_layers([layer])
    assert type(layer.dropout) is EagerKernelDropout
    with pytest.raises(RuntimeError, match="checkpoint before compiling"):
        checkpoint_layers([layer])


def saved_bytes_and_grads(model: nn.Module, batch: dict) -> tuple[int, int, list[torch.Tensor]]:
    """Bytes the forward saves for the backward (all, and inside the repeated layers' forwards), and the
    trainable parameters' gradients."""
    saved = {"all": 0, "in layers": 0}
    depth = 0

    def enter(*_: object) -> None:
        nonlocal depth
        depth += 1

    def leave(*_: object) -> None:
        nonlocal depth
        depth -= 1

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        saved["all"] += size
        saved["in layers"] += size if depth else 0
        return tensor

    layers = encoder_layers(model) + llm_layers(model)
    handles = [
        h
        for layer in layers
        for h in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))
    ]
    model.zero_grad()
    with saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model.loss(batch)["loss"]
    for handle in handles:
        handle.remove()
    loss.backward()
    return saved["all"], saved["in layers"], [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_checkpointing_the_salms_layers_saves_less_for_the_same_gradients(tiny_salm, speech_clips) -> None:
    plain = copy.deepcopy(tiny_salm).eval()  # eval: no dropout, so both runs compute the same thing
    batch = _batch(plain, speech_clips[:2], ["hello there", "yes"])
    checkpointed = copy.deepcopy(plain)
    count = use_activation_checkpointing(checkpointed, True)

    assert count == len(encoder_layers(checkpointed)) + len(llm_layers(checkpointed))
    assert not any(is_checkpointed(layer) for layer in encoder_layers(plain))  # the copy is its own
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    plain_saved, plain_in_layers, plain_grads = saved_bytes_and_grads(plain, batch)
    checkpointed_saved, checkpointed_in_layers, checkpointed_grads = saved_bytes_and_grads(
        checkpointed, batch
    )
    # What the layers saved is gone but for their inputs; the rest (mel, LM head, loss) is unchanged.
    assert checkpointed_in_layers < 0.2 * plain_in_layers
    assert plain_saved - checkpointed_saved > 0.7 * plain_in_layers
    for mine, reference in zip(checkpointed_grads, plain_grads, strict=True):
        torch.testing.assert_close(mine, reference)


@pytest.mark.parametrize("compiled", [False, True])
def test_packed_rows_recompute_with_the_packed_attention(tiny_salm, speech_clips, compiled: bool) -> None:
    """The packed loss switches the LLM's attention on for its forward only; the checkpoint's recompute
    runs in the backward, after the switch is undone, and must attend within each sequence again (with
    the padded model's attention it attended across the row: "Recomputed values ... different metadata")."""
    packed = copy.deepcopy(tiny_salm).eval()
    packed.pack_llm_sequences = True
    batch = _batch(packed, speech_clips[:3], ["hello there", "yes", "a somewhat longer answer here"])
    checkpointed = copy.deepcopy(packed)
    use_activation_checkpointing(checkpointed, "llm")
    if compiled:
        compile_layers(llm_layers(checkpointed))
    attention = checkpointed.llm.config._attn_implementation

    _, plain_in_layers, plain_grads = saved_bytes_and_grads(packed, batch)
    _, checkpointed_in_layers, checkpointed_grads = saved_bytes_and_grads(checkpointed, batch)

    assert checkpointed_in_layers < plain_in_layers  # the LLM layers kept only their inputs
    assert checkpointed.llm.config._attn_implementation == attention  # the recompute's switch is undone
    for mine, reference in zip(checkpointed_grads, plain_grads, strict=True):
        torch.testing.assert_close(mine, reference)


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        (False, ()),
        (None, ()),
        (True, ("encoder", "llm")),
        ("llm", ("llm",)),
        (["llm", "encoder"], ("encoder", "llm")),
    ],
)
def test_the_recipe_value_names_the_parts(value, parts) -> None:
    assert checkpointed_parts(value) == parts


@pytest.mark.parametrize("value", ["decoder", ["encoder", "adapter"], 3])
def test_an_unknown_part_is_refused_with_the_choices(value) -> None:
    with pytest.raises(SALMConfigError, match="false, true .* encoder, llm"):
        checkpointed_parts(value)
