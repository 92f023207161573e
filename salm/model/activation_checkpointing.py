"""Activation checkpointing of the SALM's repeated layers (``trainer.activation_checkpointing``).

Why: a training step keeps every layer's activations for the backward. At the canary recipe's 640
audio seconds per GPU that is most of the 64-75 GB peak (BENCHMARKS.md), so an 80 GB card trains
at 320 s per batch. Checkpointing a layer keeps only its inputs and runs its forward again in the
backward: less memory for about a third more compute in that layer, which buys a larger batch on
a smaller card, not speed.

Which layers: ``encoder`` (the Conformer layers: trainable, so their backward needs every
activation), ``llm`` (the LLM decoder layers: frozen with LoRA, but the backward still flows
through them to the audio) or both (``true``). PyTorch's non-reentrant ``checkpoint`` does the
work: it restores the RNG state before the recompute, so dropout draws the same masks twice, and
it composes with ``torch.compile`` (the checkpointed forward is compiled as one region) and with
DeepSpeed's gradient hooks, which sit on the parameters. Parameters, state-dict keys and
checkpoints stay those of the model.

A compiled checkpointed layer keeps Inductor's own dropout, not ``salm.model.dropout``'s eager
kernel: Inductor replays its random numbers in the recomputed forward, while the custom op would
draw a second mask there and the gradients would be wrong (tested).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from salm.errors import SALMConfigError

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


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The class's forward, looked up at call time: a deep copy of the module rebinds this method to
    # the copy (copy.deepcopy copies bound methods with their instance), never to the original.
    return checkpoint(type(self).forward.__get__(self), *args, use_reentrant=False, **kwargs)


def checkpoint_layers(layers: list[nn.Module]) -> int:
    """Give each layer a checkpointed forward (an instance attribute over the class's); returns how many.

    Idempotent. Call it before compiling, so that the compiled region is the checkpointed forward
    and ``salm.model.compile`` leaves the layer's dropout to Inductor.
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
