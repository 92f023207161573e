"""Regional compilation: ``torch.compile`` each repeated block of the SALM, not the whole model.

Why: at canary-qwen-2.5b shapes a training step is bound by the host launching kernels, not by the
GPU computing them (``bench/train_throughput.py --profile``: ~11k launches per step, the GPU busy
about half the wall). Most launches are the small elementwise ops of the 32 Conformer layers
(norms, Swish, GLU, residual adds, dropout) and their backward. Compiling a layer fuses them into a
few Triton kernels and replaces per-op Python and autograd bookkeeping by one call.

Only the repeated blocks are compiled (PyTorch's "regional compilation"): every Conformer layer
shares one compiled code, every LLM decoder layer another, so compiling costs the time of two
layers, not of the model, and the glue between them (mel front end, placeholder splicing, the
loss, NeMo's and PEFT's Python) stays eager. ``dynamic=True`` because bucketed batches change batch
size and length every step: one graph should serve them all instead of a recompile per shape.
Torch 2.13 breaks that for the Conformer layers in training (``bench/compile_recompiles.py``): its
Inductor lowering of ``aten.convolution_backward`` turns the gradient's strides into integer guards,
which pins the frame count of every 1-D convolution (the Conformer's pointwise and depthwise
convolutions before they became matmuls and shifted sums; a user's encoder may still have some).
Every new frame count then compiled the layer again, and after Dynamo's ``recompile_limit`` (8) new
ones ran eagerly. ``keep_conv1d_backward_dynamic`` sends 1-D convolution backwards to ATen's kernel,
which is what Inductor runs for them anyway (its Triton templates are 2-D only), so the graph stays
dynamic.

Generation runs the LLM eagerly (``SALM.generate`` sets the ``force_eager`` stance): the decoding
step is already one replayed CUDA graph, and with a KV cache the layer index becomes part of the
compiled code (one recompile per layer, past torch's recompile limit). The encoder stays compiled:
Serve replicas compile its layers alone (``Transcriber.user_config.compile_encoder``), which took
the encoder's time at batch 256 from 0.243 to 0.175 s on an H200 (BENCHMARKS.md).

``nn.Module.compile`` works in place: parameter names, state-dict keys, DeepSpeed's gradient hooks
(on the parameters) and checkpoints are exactly those of the eager model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from salm.model.activation_checkpointing import (
    checkpointed_function,
    is_checkpointed,
    set_checkpointed_function,
)
from salm.model.dropout import use_eager_kernel_dropout
from salm.model.llm import base_causal_lm

# Added to torch's compile cache key once 1-D convolution backwards are lowered our way.
CACHE_KEY_TAG = "salm-ray:conv1d-backward-aten"

# Under the recipe's ``trainer.compile_options``. Inductor's layout optimisation (channels-last
# activations around convolutions) is always on for CPU graphs with convolutions in torch 2.13: in a
# Conformer layer compiled as one graph it specialised the frame count (a recompile per length) and,
# with padded attention keys, crashed Inductor ("Exponent must be non-negative"). On CUDA Inductor
# leaves it off for dynamic shapes anyway, so this changes nothing on the GPU. ``fallback_random``: the
# layers' dropouts call ATen's dropout kernel instead of Inductor's Triton RNG (``salm.model.dropout``).
DEFAULT_INDUCTOR_OPTIONS = {"layout_optimization": False, "fallback_random": True}


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The SALM's Conformer encoder layers (none for an encoder without ``layers``)."""
    return list(getattr(model.perception.encoder, "layers", []))


def llm_layers(model: nn.Module) -> list[nn.Module]:
    """The SALM's LLM decoder layers."""
    return list(base_causal_lm(model.llm).model.layers)


def repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The SALM's repeated blocks: the Conformer encoder's layers, then the LLM decoder's layers."""
    return encoder_layers(model) + llm_layers(model)


def compile_repeated_layers(model: nn.Module, inductor_options: Mapping[str, Any] | None = None) -> int:
    """Compile every repeated block of ``model`` in place (``dynamic=True``); returns how many.

    ``inductor_options`` go to Inductor as ``torch.compile(options=...)`` does (the recipe's
    ``trainer.compile_options``; the canary recipe sets ``cpp_wrapper``: the code that launches a
    layer's kernels is generated in C++ instead of Python, which cuts the host time the step is
    bound by). The first step after this pays the compilation (about a minute per block type on a
    GPU host, minutes on a small CPU); later steps reuse it.
    """
    return compile_layers(repeated_layers(model), inductor_options)


def compile_layers(layers: list[nn.Module], inductor_options: Mapping[str, Any] | None = None) -> int:
    """Compile each of ``layers`` in place as the recipe does; returns how many.

    ``dynamic=True``, 1-D convolution backwards kept dynamic (``keep_conv1d_backward_dynamic``),
    dropout masks drawn by ATen's kernel (``salm.model.dropout``), the Conformer's depthwise
    convolutions as shifted sums that Inductor fuses (``salm.model.depthwise_conv``) and
    ``inductor_options`` over ``DEFAULT_INDUCTOR_OPTIONS``. A layer with activation checkpointing
    gets its forward compiled inside the checkpoint, not the checkpoint
    (``salm.model.activation_checkpointing`` says why).
    The benchmarks that time a slice of the encoder call this too, so they compile what training
    compiles.
    """
    from salm.model.depthwise_conv import use_shifted_sum_depthwise_convs  # imports NeMo

    keep_conv1d_backward_dynamic()
    use_eager_kernel_dropout(layers)
    for layer in layers:
        use_shifted_sum_depthwise_convs(layer)  # fusable arithmetic; uncompile_layers puts NeMo's back
    options = {**DEFAULT_INDUCTOR_OPTIONS, **(inductor_options or {})}
    for layer in layers:
        if is_checkpointed(layer):
            compiled = torch.compile(checkpointed_function(layer), dynamic=True, options=options)
            set_checkpointed_function(layer, compiled)
        else:
            layer.compile(dynamic=True, options=options)
    return len(layers)


def is_compiled(layer: nn.Module) -> bool:
    """Whether ``layer.compile()`` (``compile_layers``) has compiled it in place and it is not undone."""
    return getattr(layer, "_compiled_call_impl", None) is not None


def uncompile_layers(layers: list[nn.Module]) -> None:
    """Run ``layers`` eagerly again after ``compile_layers`` (e.g. when compiling failed).

    ``nn.Module.compile`` keeps the compiled callable in ``_compiled_call_impl`` and calls it when
    set; torch has no public call to undo it. The depthwise convolutions go back to NeMo's (cuDNN's
    kernel is the faster one eagerly). Checkpointed layers are not handled (inference only).
    """
    from salm.model.depthwise_conv import use_shifted_sum_depthwise_convs

    for layer in layers:
        layer._compiled_call_impl = None
        use_shifted_sum_depthwise_convs(layer, enabled=False)


def inductor_options_error(options: Mapping[str, Any]) -> str | None:
    """Why Inductor would refuse ``options`` (a name it does not have, a value of the wrong type), or None.

    The recipe asks this when it loads: ``torch.compile`` itself refuses them only in the Ray
    worker, after the model and the DeepSpeed engine are built.
    """
    from torch._inductor import config

    known = set(config.get_config_copy())
    unknown = sorted(key for key in options if key not in known)
    if unknown:
        return (
            f"not Inductor options: {', '.join(unknown)}; the names are those of torch._inductor.config "
            "(e.g. cpp_wrapper, triton.cudagraphs)"
        )
    try:  # torch checks each value's type when the options are handed over, before anything compiles
        torch.compile(lambda: None, options=dict(options))
    except RuntimeError as error:
        return str(error)
    return None


def keep_conv1d_backward_dynamic() -> bool:
    """Lower 1-D convolution backwards to ATen's kernel so that Inductor keeps their length symbolic.

    Torch 2.13's Inductor lowering of ``aten.convolution_backward`` guards the gradient's strides
    as integers when it picks their order (``guard_int_seq`` in ``torch/_inductor/kernel/conv.py``).
    For ``[batch, channels, frames]`` that guard is ``frames == <this batch's frames>``, so a layer
    compiled with ``dynamic=True`` recompiles for every frame count. 1-D convolutions have no
    Triton template there, so the lowering ends in ATen's kernel anyway; calling that fallback
    directly gives the same kernel without the guard. 2-D convolutions keep torch's lowering.

    Compiled artefacts in Inductor's and AOTAutograd's on-disk caches do not record which lowering
    built them, and one built with torch's carries the pinned length. So the cache key gets a tag
    (``torch.compiler.config.cache_key_tag``, added to any tag the user set): artefacts built before
    the replacement are not reused after it.

    Idempotent; returns True when the lowering was replaced (or already had been), False on a torch
    without that lowering, where nothing pins the length.
    """
    from torch._inductor import lowering
    from torch._inductor.kernel import conv

    fallback = getattr(conv, "aten_convolution_backward_fallback", None)
    op = torch.ops.aten.convolution_backward.default
    torch_lowering = lowering.lowerings.get(op)
    if fallback is None or torch_lowering is None:
        return False
    if getattr(torch_lowering, "keeps_conv1d_dynamic", False):
        return True

    def lower_convolution_backward(grad_out, input, weight, *args, **kwargs):  # noqa: ANN001, ANN202
        if len(weight.get_size()) == 3:  # [out_channels, in_channels / groups, kernel]: a Conv1d
            return fallback(grad_out, input, weight, *args, **kwargs)
        return torch_lowering(grad_out, input, weight, *args, **kwargs)

    lower_convolution_backward.keeps_conv1d_dynamic = True
    lowering.lowerings[op] = lower_convolution_backward
    user_tag = torch.compiler.config.cache_key_tag
    torch.compiler.config.cache_key_tag = f"{user_tag};{CACHE_KEY_TAG}" if user_tag else CACHE_KEY_TAG
    return True
