"""Activation checkpointing of the SALM's repeated layers (``trainer.activation_checkpointing``).

Why: a training step keeps every layer's activations for the backward. At the canary recipe's 640
audio seconds per GPU that is most of the 64-75 GB peak (BENCHMARKS.md), so an 80 GB card trains
at 320 s per batch. Checkpointing a layer keeps only its inputs and runs its forward again in the
backward: less memory for more compute (on an H200 at canary shapes, eager layers: 75.4 -> 23.4 GB
and 1.62x the time per pass; the frozen LLM's backward computes no weight gradients, so its
recompute adds about half of its compute), which buys a larger batch on a smaller card, not speed.

Which layers: ``encoder`` (the Conformer layers: trainable, so their backward needs every
activation), ``llm`` (the LLM decoder layers: frozen with LoRA, but the backward still flows
through them to the audio) or both (``true``). PyTorch's non-reentrant ``checkpoint`` does the
work: it restores the RNG state before the recompute, so dropout draws the same masks twice, and
it works with DeepSpeed's gradient hooks, which sit on the parameters. Parameters, state-dict keys
and checkpoints stay those of the model.

With compiled layers the checkpoint stays outside the compiled code: ``salm.model.compile`` compiles
the layer's own forward (``set_checkpointed_function``) and the checkpoint calls that. Inside the
compiled region (torch's usual ``checkpoint`` under ``torch.compile``), torch 2.11's AOTAutograd
partitioner failed at the first step for both layer kinds on the GPU ("Node add_N was invalid, but
is output", in train mode with dynamic shapes) and Inductor's C++ wrapper (the canary recipe's
``cpp_wrapper``) could not call the operator that replays the attention's random state (tested).
Outside, the compiled forward simply runs again from the forward's RNG state (tested: same masks).

The recompute also runs under the forward's LLM attention: the packed loss (``salm.model.packing``)
switches the attention on around its forward only, and the backward runs after the switch is
undone. Without this, a packed LLM layer recomputed with the padded model's attention, across the
whole packed row (torch: "Recomputed values ... have different metadata").
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from salm.errors import SALMConfigError
from salm.model.llm import attention_implementation

PARTS = ("encoder", "llm")


def checkpointed_parts(value: Any) -> tuple[str, ...]:
    """``trainer.activation_checkpointing`` -> the parts to checkpoint: false, true, a part or a list of parts."""
    if value is None or value is False:
        return ()
    if value is True:
        return PARTS
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, Sequence):  # a list, or the recipe's ListConfig
        names = list(value)
    else:
        names = None
    if names is None or any(name not in PARTS for name in names):
        raise SALMConfigError(
            "`trainer.activation_checkpointing` must be false, true (every repeated layer), "
            f"encoder, llm or a list of those; got {value!r}"
        )
    return tuple(name for name in PARTS if name in names)


# The instance attribute holding what a checkpointed layer's checkpoint runs, once compiled.
CHECKPOINTED_FUNCTION = "checkpointed_function"


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    contexts = functools.partial(_forward_and_recompute_contexts, self)
    return checkpoint(checkpointed_function(self), *args, use_reentrant=False, context_fn=contexts, **kwargs)


def _forward_and_recompute_contexts(
    layer: nn.Module,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The checkpoint calls this at the forward: the recompute runs under the attention the LLM layer
    (transformers' ``self_attn.config``) runs now. The Conformer layers have no such switch."""
    config = getattr(getattr(layer, "self_attn", None), "config", None)
    if config is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), attention_implementation(config, config._attn_implementation)


def checkpointed_function(layer: nn.Module) -> Callable[..., Any]:
    """What ``layer``'s checkpoint runs: its compiled forward if ``set_checkpointed_function`` gave one, else
    the class's forward, looked up at call time (a deep copy of the module rebinds this method to the copy:
    copy.deepcopy copies bound methods with their instance)."""
    return layer.__dict__.get(CHECKPOINTED_FUNCTION) or type(layer).forward.__get__(layer)


def set_checkpointed_function(layer: nn.Module, function: Callable[..., Any]) -> None:
    """Run ``function`` (``layer``'s forward, compiled) inside ``layer``'s checkpoint."""
    if not is_checkpointed(layer):
        raise RuntimeError("set_checkpointed_function: checkpoint the layer first (checkpoint_layers)")
    layer.__dict__[CHECKPOINTED_FUNCTION] = function


def checkpoint_layers(layers: list[nn.Module]) -> int:
    """Give each layer a checkpointed forward (an instance attribute over the class's); returns how many.

    Idempotent. Call it before compiling, so that ``salm.model.compile`` compiles what runs inside the
    checkpoint, not the checkpoint.
    """
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is not None and not is_checkpointed(layer):
            raise RuntimeError(
                "checkpoint_layers: this layer is compiled already; checkpoint before compiling"
            )
        if not is_checkpointed(layer):
            layer.forward = types.MethodType(_checkpointed_forward, layer)
    return len(layers)


def is_checkpointed(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


def use_activation_checkpointing(model: nn.Module, value: Any) -> int:
    """Checkpoint the repeated layers of ``model`` that ``value`` names; returns how many layers."""
    from salm.model.compile import encoder_layers, llm_layers

    layers = {"encoder": encoder_layers, "llm": llm_layers}
    return sum(checkpoint_layers(layers[part](model)) for part in checkpointed_parts(value))
