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
It does not for the Conformer layers in training, measured on CPU with torch 2.13
(``bench/compile_recompiles.py``): compiling the backward pins the frame count, so every new frame
count compiles the layer again, and after Dynamo's ``recompile_limit`` (8) new ones run eagerly
(Dynamo logs "hit config.recompile_limit"). The GPU benchmarks use 5 fixed buckets, under the limit.

Generation runs the LLM eagerly (``SALM.generate`` sets the ``force_eager`` stance): the decoding
step is already one replayed CUDA graph, and with a KV cache the layer index becomes part of the
compiled code (one recompile per layer, past torch's recompile limit). The encoder stays compiled.

``nn.Module.compile`` works in place: parameter names, state-dict keys, DeepSpeed's gradient hooks
(on the parameters) and checkpoints are exactly those of the eager model.
"""

from __future__ import annotations

from torch import nn

from salm.model.llm import base_causal_lm


def repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The SALM's repeated blocks: the Conformer encoder's layers, then the LLM decoder's layers."""
    encoder_layers = list(getattr(model.perception.encoder, "layers", []))
    return encoder_layers + list(base_causal_lm(model.llm).model.layers)


def compile_repeated_layers(model: nn.Module) -> int:
    """Compile every repeated block of ``model`` in place (``dynamic=True``); returns how many.

    The first step after this pays the compilation (about a minute per block type on a GPU host,
    minutes on a small CPU); later steps reuse it.
    """
    layers = repeated_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
