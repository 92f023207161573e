"""Memory layouts for the FastConformer's GPU kernels, same numbers: opt-in, off by default.

Two levers (``model.perception`` keys). In the encoder alone (4 canary-shape layers, eager, H200)
they cut a forward + backward by 23%; in the canary recipe's compiled training step, both on made
a pass 1.55x slower (4.30 vs 2.78 s, same run; BENCHMARKS.md, "Encoder layouts"). Alone,
channels-last made the compiled step 11% slower, and padded frames made it fail to compile on the
GPU image (torch 2.11), so the recipes leave both off and ``salm.train.recipe`` refuses
``pad_frames_to`` with ``trainer.compile_layers``. Eager training may use them (unmeasured there).

- **``channels_last_subsampling``.** ``dw_striding`` subsampling is a Conv2d then depthwise +
  pointwise Conv2d pairs. In bf16 with the default (NCHW) layout, PyTorch runs a depthwise
  convolution on its own native kernel; it hands it to cuDNN only for fp16 or for channels-last
  inputs. The native kernel's backward was ~90 ms per 3,200 audio seconds at canary shapes. A
  channels-last input to the first convolution makes every later one channels-last too (their
  outputs follow the input). The weights keep their layout: DeepSpeed's flat buffers and
  safetensors need them contiguous.
- **``pad_frames_to``** (set in NeMo's own preprocessor ``pad_to``): after 8x subsampling a mel
  length that is a multiple of 64 gives a multiple of 8 encoder frames, and each attention's
  position table gets one unused row (2T, not 2T - 1), so both attention matmuls have 8-aligned
  shapes and cuBLAS can pick its aligned kernels, not the SM75 ``align1`` ones the training profile
  showed. The lengths (and so every mask) are unchanged; the extra frames are padding like any
  other in a bucketed batch.
"""

from __future__ import annotations

import torch
from torch import nn

from salm.errors import SALMConfigError

CHANNELS_LAST_DEVICES = {"cuda"}  # the GPU's kernels are the point; the CPU keeps NCHW


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    features = args[0]
    if features.device.type in CHANNELS_LAST_DEVICES and features.dim() == 4:
        # `.to`, not `.contiguous`: a one-channel NCHW tensor already counts as channels-last
        # contiguous, but its strides still make the convolution choose NCHW. `.to` restrides it.
        return (features.to(memory_format=torch.channels_last), *args[1:])
    return None


def use_channels_last_subsampling(encoder: nn.Module) -> bool:
    """Make the encoder's convolutional subsampling run channels-last on CUDA; returns whether it has one.

    Hooks the first Conv2d of ``encoder.pre_encode`` (a forward pre-hook, so the module, its weights
    and its state-dict keys stay NeMo's), once however often it is called. Encoders without a Conv2d
    subsampling are left alone.
    """
    pre_encode = getattr(encoder, "pre_encode", None)
    first_conv = (
        next((m for m in pre_encode.modules() if isinstance(m, nn.Conv2d)), None) if pre_encode else None
    )
    if first_conv is None:
        return False
    if _channels_last_input not in first_conv._forward_pre_hooks.values():
        first_conv.register_forward_pre_hook(_channels_last_input)
    return True


def set_frame_padding(preprocessor: nn.Module, encoder: nn.Module, multiple: int | None) -> None:
    """Pad mel frames to a multiple of ``multiple`` (NeMo's ``pad_to``) and give the encoder's
    strided-shift attentions a 2T-row position table; None or 0: off (NeMo's layout).

    Why not ``preprocessor.pad_to`` in the config: with ``pretrained_asr`` the preprocessor section
    is replaced by the ASR model's (``pad_to: 0`` in released FastConformers), as NeMo does.
    """
    if multiple is None:
        return
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 0:
        raise SALMConfigError(
            f"`model.perception.pad_frames_to` must be a whole number >= 0 (e.g. 64: a multiple of 8 "
            f"encoder frames after 8x subsampling; 0: no padding), got {multiple!r}"
        )
    featurizer = getattr(preprocessor, "featurizer", None)
    if featurizer is None or not hasattr(featurizer, "pad_to"):
        raise SALMConfigError(
            "`model.perception.pad_frames_to` needs NeMo's AudioToMelSpectrogramPreprocessor "
            f"(it sets its featurizer's pad_to); this preprocessor is a {type(preprocessor).__name__}"
        )
    featurizer.pad_to = multiple
    pad_position_tables(encoder, multiple > 0)


def pad_position_tables(encoder: nn.Module, enabled: bool) -> None:
    """Give (or take back) every strided-shift attention of ``encoder`` its 2T-row position table."""
    from salm.model.rel_shift import StridedRelPositionAttention  # imports NeMo, like the builders

    for module in encoder.modules():
        if isinstance(module, StridedRelPositionAttention):
            module.pad_position_table = enabled
