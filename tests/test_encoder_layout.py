"""GPU memory layouts of the encoder (``salm.model.encoder_layout``): same numbers, other kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from nemo.collections.asr.modules import ConformerEncoder

from salm.errors import SALMConfigError
from salm.model import encoder_layout
from salm.model.encoder_layout import use_channels_last_subsampling
from salm.model.perception import AudioPerception


def dw_striding_encoder() -> ConformerEncoder:
    torch.manual_seed(0)
    return ConformerEncoder(
        feat_in=16,
        n_layers=1,
        d_model=32,
        n_heads=4,
        subsampling="dw_striding",
        subsampling_factor=8,
        subsampling_conv_channels=8,
    ).eval()  # eval: dropout off, so both copies compute the same thing


def depthwise_conv(encoder: torch.nn.Module) -> torch.nn.Conv2d:
    """The subsampling's first depthwise convolution: its input shows the layout the hook chose."""
    return next(m for m in encoder.pre_encode.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)


def test_channels_last_subsampling_changes_the_layout_not_the_outputs_or_gradients(monkeypatch) -> None:
    """On CUDA the hook is on; on this CPU we turn it on to check what it computes."""
    monkeypatch.setattr(encoder_layout, "CHANNELS_LAST_DEVICES", {"cpu"})
    nemo = dw_striding_encoder().double()  # float64: any difference left is not rounding
    ours = copy.deepcopy(nemo)
    assert use_channels_last_subsampling(ours) and use_channels_last_subsampling(ours)
    first_conv = next(m for m in ours.pre_encode.modules() if isinstance(m, torch.nn.Conv2d))
    assert len(first_conv._forward_pre_hooks) == 1  # a second call hooks nothing more
    depthwise_inputs = []
    depthwise_conv(ours).register_forward_pre_hook(lambda module, args: depthwise_inputs.append(args[0]))
    features, lengths = torch.randn(3, 16, 131, dtype=torch.float64), torch.tensor([131, 90, 41])
    results = []
    for model in (nemo, ours):
        encoded, encoded_lens = model(audio_signal=features, length=lengths)
        encoded.square().sum().backward()
        results.append((encoded, encoded_lens, [p.grad for p in model.parameters()]))
    (nemo_out, nemo_lens, nemo_grads), (our_out, our_lens, our_grads) = results
    assert depthwise_inputs[0].stride(1) == 1  # channels-last: what sends a bf16 depthwise conv to cuDNN
    assert torch.equal(our_lens, nemo_lens)
    torch.testing.assert_close(our_out, nemo_out, rtol=1e-9, atol=1e-9)
    # Against the largest gradient: the key bias's gradient is zero in exact arithmetic (softmax
    # ignores a constant added to every key), so only its rounding noise differs.
    scale = max(grad.abs().max().item() for grad in nemo_grads)
    for ours_grad, nemo_grad in zip(our_grads, nemo_grads, strict=True):
        torch.testing.assert_close(ours_grad, nemo_grad, rtol=1e-9, atol=1e-12 * scale)
    # The weights keep their layout: DeepSpeed flattens them, safetensors needs them contiguous.
    assert all(p.is_contiguous() for p in ours.parameters())


def test_the_cpu_keeps_nchw_and_encoders_without_conv_subsampling_are_left_alone() -> None:
    encoder = dw_striding_encoder()
    use_channels_last_subsampling(encoder)
    seen = []
    depthwise_conv(encoder).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    encoder(audio_signal=torch.randn(1, 16, 64), length=torch.tensor([64]))
    assert seen[0].is_contiguous()  # NCHW: channels-last is measured on GPUs only
    assert not use_channels_last_subsampling(torch.nn.Linear(2, 2))


def test_channels_last_subsampling_is_an_opt_in_perception_key(tiny_model_cfg, monkeypatch) -> None:
    monkeypatch.setattr(encoder_layout, "CHANNELS_LAST_DEVICES", {"cpu"})
    tiny_model_cfg.perception.output_dim = 64
    waveforms, lengths = torch.randn(1, 16000), torch.tensor([16000])
    for enabled in (False, True):
        tiny_model_cfg.perception.channels_last_subsampling = enabled
        perception = AudioPerception(tiny_model_cfg.perception).eval()
        seen = []
        convs = [m for m in perception.encoder.pre_encode.modules() if isinstance(m, torch.nn.Conv2d)]
        convs[-1].register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            perception(waveforms, lengths)
        assert (seen[0].stride(1) == 1) is enabled


def test_a_channels_last_subsampling_that_is_not_a_boolean_is_refused(tiny_model_cfg) -> None:
    tiny_model_cfg.perception.output_dim = 64
    tiny_model_cfg.perception.channels_last_subsampling = "false"  # a string: truthy, so refused
    with pytest.raises(SALMConfigError, match="channels_last_subsampling` must be true or false"):
        AudioPerception(tiny_model_cfg.perception)


def test_a_perception_switches_its_layout_back_to_nchw_and_unpadded_keys(tiny_model_cfg, monkeypatch) -> None:
    """What a Serve replica does to a model trained with the canary recipe's layout: the same weights,
    NCHW again (only the layout hook goes, others stay) and NeMo's T keys, then the layout back."""
    from salm.model.rel_shift import StridedRelPositionAttention

    monkeypatch.setattr(encoder_layout, "CHANNELS_LAST_DEVICES", {"cpu"})
    tiny_model_cfg.perception.output_dim = 64
    tiny_model_cfg.perception.channels_last_subsampling = True
    tiny_model_cfg.perception.pad_attention_keys_to = 8
    perception = AudioPerception(tiny_model_cfg.perception).eval()
    first_conv = next(m for m in perception.encoder.pre_encode.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda module, args: None)  # someone else's hook
    attentions = [m for m in perception.encoder.modules() if isinstance(m, StridedRelPositionAttention)]
    assert attentions and all(m.key_multiple == 8 for m in attentions)
    waveforms, lengths = torch.randn(2, 12345), torch.tensor([12345, 9000])

    def run() -> tuple[torch.Tensor, bool]:
        seen = []
        handle = depthwise_conv(perception.encoder).register_forward_pre_hook(
            lambda module, args: seen.append(args[0])
        )
        with torch.no_grad():
            encoded, _ = perception(waveforms, lengths)
        handle.remove()
        return encoded, seen[0].stride(1) == 1

    trained, trained_channels_last = run()
    perception.set_encoder_layout(channels_last_subsampling=False, pad_attention_keys_to=None)
    served, served_channels_last = run()
    assert trained_channels_last and not served_channels_last
    assert all(m.key_multiple == 0 for m in attentions)
    assert len(first_conv._forward_pre_hooks) == 1  # the other hook is still there
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-5)  # same numbers, other kernels
    perception.set_encoder_layout(channels_last_subsampling=True, pad_attention_keys_to=8)
    assert run()[1] and all(m.key_multiple == 8 for m in attentions)
    with pytest.raises(SALMConfigError, match="channels_last_subsampling` must be true or false"):
        perception.set_encoder_layout(channels_last_subsampling="no", pad_attention_keys_to=None)
