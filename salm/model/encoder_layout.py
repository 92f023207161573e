"""A memory layout for the FastConformer's GPU kernels, same numbers: off by default and in every recipe.

**``channels_last_subsampling``** (a ``model.perception`` key). ``dw_striding`` subsampling is a
Conv2d then depthwise + pointwise Conv2d pairs. In bf16 with the default (NCHW) layout, PyTorch runs
a depthwise convolution on its own native kernel; it hands it to cuDNN only for fp16 or for
channels-last inputs. The native kernel's backward was ~90 ms per 3,200 audio seconds at canary
shapes. A channels-last input to the first convolution makes every later one channels-last too
(their outputs follow the input). The weights keep their layout: DeepSpeed's flat buffers and
safetensors need them contiguous.

In the encoder alone (4 canary-shape layers, eager, H200) it cut a forward + backward by 23% (with
8-aligned frames). In the canary recipe's compiled training step it first made a pass 11% slower
(fifth session, cause not found); with today's step (one graph per Conformer layer, C++ wrapper,
padded attention keys) it takes 70 ms of convolution time off the GPU per pass and the pass
0.8-6% less wall on shapes it has seen (BENCHMARKS.md, "Channels-last subsampling"). But cuDNN
sets up its channels-last kernels for every new input shape: ~1.8 s per new frame count in a
training step and ~0.45 s in inference on an H200, against ~0.03 s in NCHW
(``bench/new_shape_cost.py``; BENCHMARKS.md, "What a new frame count costs"). Bucketed batches bring
a new frame count at nearly every step, and served clips at nearly every request, so no recipe
turns it on; it stays for inputs whose shapes repeat. (The stem and pointwise convolutions now run as
matmuls, ``salm.model.subsampling_convs``, which keep a channels-last input channels-last; the
depthwise ones are then cuDNN's.)
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS_LAST_DEVICES = {"cuda"}  # the GPU's kernels are the point; the CPU keeps NCHW


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    features = args[0]
    if features.device.type in CHANNELS_LAST_DEVICES and features.dim() == 4:
        # `.to`, not `.contiguous`: a one-channel NCHW tensor already counts as channels-last
        # contiguous, but its strides still make the convolution choose NCHW. `.to` restrides it.
        return (features.to(memory_format=torch.channels_last), *args[1:])
    return None


def _first_subsampling_conv(encoder: nn.Module) -> nn.Conv2d | None:
    pre_encode = getattr(encoder, "pre_encode", None)
    return next((m for m in pre_encode.modules() if isinstance(m, nn.Conv2d)), None) if pre_encode else None


def use_channels_last_subsampling(encoder: nn.Module, enabled: bool = True) -> bool:
    """Make the encoder's convolutional subsampling run channels-last on CUDA (or NCHW again with
    ``enabled=False``); returns whether it has one.

    Hooks the first Conv2d of ``encoder.pre_encode`` (a forward pre-hook, so the module, its weights
    and its state-dict keys stay NeMo's), once however often it is called. Encoders without a Conv2d
    subsampling are left alone. Inference turns it off: a new clip length cost its first request
    0.3-0.6 s with it on (BENCHMARKS.md, "the encoder layout options").
    """
    first_conv = _first_subsampling_conv(encoder)
    if first_conv is None:
        return False
    hooks = first_conv._forward_pre_hooks
    if not enabled:
        for handle_id in [key for key, hook in hooks.items() if hook is _channels_last_input]:
            del hooks[handle_id]
    elif _channels_last_input not in hooks.values():
        first_conv.register_forward_pre_hook(_channels_last_input)
    return True


def uses_channels_last_subsampling(encoder: nn.Module) -> bool:
    """Whether ``use_channels_last_subsampling`` has hooked this encoder (and not unhooked it)."""
    first_conv = _first_subsampling_conv(encoder)
    return first_conv is not None and _channels_last_input in first_conv._forward_pre_hooks.values()
