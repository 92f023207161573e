"""Audio perception: NeMo mel preprocessor -> FastConformer encoder -> modality adapter -> proj.

Built from the same config section as NeMo's ``AudioPerceptionModule`` (``preprocessor``,
``encoder``, ``modality_adapter``, ``spec_augment``, ``output_dim``; ours adds
``pad_attention_keys_to``, see ``salm.model.rel_shift``, and ``channels_last_subsampling``, see
``salm.model.encoder_layout``) and with the same
state-dict keys, so canary-qwen-2.5b's ``perception.*`` weights load unchanged.
``_target_`` entries are resolved against an allow-list rather than imported blindly: a config
file must not be able to run arbitrary code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from salm.errors import SALMConfigError
from salm.model.adapters import IdentityAdapter, StackingMLPAdapter
from salm.model.encoder_layout import use_channels_last_subsampling
from salm.model.feature_normalization import normalize_per_feature, take_over_per_feature_normalization


def _nemo_preprocessor(**kwargs):
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

    return AudioToMelSpectrogramPreprocessor(**kwargs)


def _nemo_spec_augment(**kwargs):
    from nemo.collections.asr.modules import SpectrogramAugmentation

    return SpectrogramAugmentation(**kwargs)


def _nemo_conformer(**kwargs):
    from nemo.collections.asr.modules import ConformerEncoder

    return ConformerEncoder(**kwargs)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor": _nemo_preprocessor,
    "nemo.collections.asr.modules.audio_preprocessing.AudioToMelSpectrogramPreprocessor": _nemo_preprocessor,
    "nemo.collections.asr.modules.SpectrogramAugmentation": _nemo_spec_augment,
    "nemo.collections.asr.modules.audio_preprocessing.SpectrogramAugmentation": _nemo_spec_augment,
    "nemo.collections.asr.modules.ConformerEncoder": _nemo_conformer,
    "nemo.collections.asr.modules.conformer_encoder.ConformerEncoder": _nemo_conformer,
    "nemo.collections.speechlm2.modules.perception.IdentityConnector": IdentityAdapter,
    "salm.model.adapters.IdentityAdapter": IdentityAdapter,
    "salm.model.adapters.StackingMLPAdapter": StackingMLPAdapter,
}


def build_from_target(section: str, cfg: DictConfig | dict) -> nn.Module:
    """Instantiate ``cfg._target_`` (one of ``BUILDERS``) with the remaining keys as arguments."""
    kwargs = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    target = kwargs.pop("_target_", None)
    if target not in BUILDERS:
        raise SALMConfigError(
            f"`model.perception.{section}._target_` is {target!r}; supported: {', '.join(sorted(BUILDERS))}"
        )
    return BUILDERS[target](**kwargs)


# The encoder layout inference runs (Serve replicas, `salm generate`, `salm evaluate`): NCHW
# subsampling and NeMo's T attention keys. Same numbers as the canary recipe's training layout, but
# on an H200 that layout cost each new input shape 0.3-0.6 s, and inference meets a new shape at
# nearly every batch (BENCHMARKS.md, "the encoder layout options").
INFERENCE_ENCODER_LAYOUT = {"channels_last_subsampling": False, "pad_attention_keys_to": None}


def configured_encoder_layout(perception_cfg: DictConfig) -> dict:
    """The encoder layout a ``model.perception`` config asks for (both options off when absent)."""
    return {
        "channels_last_subsampling": perception_cfg.get("channels_last_subsampling", False),
        "pad_attention_keys_to": perception_cfg.get("pad_attention_keys_to"),
    }


class AudioPerception(nn.Module):
    """Waveforms ``(B, T_samples)`` -> LLM-sized audio embeddings ``(B, T_frames, H)`` with lengths."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        for section in ("preprocessor", "encoder", "modality_adapter"):
            if cfg.get(section) is None:
                raise SALMConfigError(f"`model.perception.{section}` is missing")
        self.preprocessor = build_from_target("preprocessor", cfg.preprocessor)
        _unpin_featurizer_forward(self.preprocessor)
        # NeMo's per-feature normalisation waits for the GPU on every batch; ours computes the same
        # numbers without the wait (salm.model.feature_normalization). Runtime only: the config keeps
        # `normalize: per_feature`, so a saved model means the same to NeMo.
        self.normalizes_per_feature = take_over_per_feature_normalization(self.preprocessor)
        self.encoder = build_from_target("encoder", cfg.encoder)
        if "sync_max_audio_length" not in cfg.encoder:
            # NeMo's default all-reduces every batch's frame count over the ranks and reads it back
            # (a wait for the GPU at the start of each forward), only so that every rank grows its
            # positional-encoding buffer alike; a rank that grows its own computes the same values.
            self.encoder.sync_max_audio_length = False
        from salm.model.pointwise_conv import use_matmul_pointwise_convs  # imports NeMo, like the builders
        from salm.model.rel_shift import use_strided_rel_shift
        from salm.model.subsampling_convs import use_matmul_subsampling_convs

        use_strided_rel_shift(self.encoder)  # same numbers; compiled, 19 ms of kernels per pass, not 282
        use_matmul_pointwise_convs(self.encoder)  # same numbers, aligned GEMMs for every frame count
        use_matmul_subsampling_convs(self.encoder)  # same numbers, no cuDNN set-up per new frame count
        self.set_encoder_layout(**configured_encoder_layout(cfg))
        spec_augment = cfg.get("spec_augment")
        self.spec_augmentation = build_from_target("spec_augment", spec_augment) if spec_augment else None
        self.modality_adapter = build_from_target("modality_adapter", cfg.modality_adapter)
        adapter = cfg.modality_adapter
        # NeMo's rule: an adapter that declares d_model but no output_dim is followed by a Linear.
        if "output_dim" not in adapter and "d_model" in adapter:
            self.proj = nn.Linear(adapter.d_model, cfg.output_dim)
        else:
            self.proj = nn.Identity()

    def set_encoder_layout(self, channels_last_subsampling: bool, pad_attention_keys_to: int | None) -> None:
        """The encoder's two GPU layout options (same numbers, other kernels): the constructor applies
        the config's ``perception.channels_last_subsampling`` and ``pad_attention_keys_to``; inference
        switches to ``INFERENCE_ENCODER_LAYOUT`` for the same weights.

        Off by default; the canary recipe turns both on for training (``salm/model/encoder_layout.py``
        and ``salm/model/rel_shift.py`` say why)."""
        from salm.model.rel_shift import set_key_padding

        if not isinstance(channels_last_subsampling, bool):
            raise SALMConfigError(
                "`model.perception.channels_last_subsampling` must be true or false, "
                f"got {channels_last_subsampling!r}"
            )
        set_key_padding(self.encoder, pad_attention_keys_to)
        use_channels_last_subsampling(self.encoder, enabled=channels_last_subsampling)

    @property
    def sampling_rate(self) -> int:
        return int(self.preprocessor.featurizer.sample_rate)

    @property
    def token_equivalent_duration(self) -> float:
        """Audio seconds per LLM position: hop / rate x encoder subsampling x adapter subsampling."""
        featurizer = self.preprocessor.featurizer
        frame_shift = featurizer.hop_length / featurizer.sample_rate
        adapter_factor = getattr(self.modality_adapter, "subsampling_factor", 1)
        return frame_shift * self.encoder.subsampling_factor * adapter_factor

    def frame_counts(self, input_signal_length: torch.Tensor) -> torch.Tensor | None:
        """The ``(N,)`` audio embedding lengths ``forward`` returns for waveforms of these lengths, in samples.

        Computed by the mel front end's, the subsampling's and the adapter's own length arithmetic,
        on the lengths' device: for a collated batch, the host, where the training loop plans the
        LLM rows without waiting for the GPU (``salm.model.batch_layout``). None when a module's
        frame count is not known here (an encoder with a mid-stack reduction, another adapter).
        """
        featurizer = self.preprocessor.featurizer
        lengths = featurizer.get_seq_len(input_signal_length)
        lengths = torch.where(input_signal_length == 0, 0, lengths)  # as FilterbankFeatures.forward
        lengths = conformer_frame_counts(self.encoder, lengths)
        if lengths is None:
            return None
        adapter = self.modality_adapter
        if hasattr(adapter, "output_lengths"):  # ours
            return adapter.output_lengths(lengths).to(torch.int64)
        if hasattr(adapter, "pre_encode"):  # a NeMo Conformer as adapter
            return conformer_frame_counts(adapter, lengths)
        return None

    def mel_features(
        self, input_signal: torch.Tensor, input_signal_length: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's input: normalised log-mel features ``(B, n_mels, T)`` in fp32, and their lengths.

        fp32 even when the model runs in bf16 (as NeMo does): log-mel of a bf16 waveform loses most of
        its resolution.
        """
        from nemo.core.classes.common import typecheck

        # NeMo's neural-type checks cost host time on every call; shapes are checked by our tests.
        with typecheck.disable_checks(), torch.autocast(input_signal.device.type, enabled=False):
            features, feature_lens = self.preprocessor(
                input_signal=input_signal.float(), length=input_signal_length
            )
            if self.normalizes_per_feature:
                pad_value = self.preprocessor.featurizer.pad_value
                features = normalize_per_feature(features, feature_lens, pad_value)
        return features, feature_lens

    def forward(
        self, input_signal: torch.Tensor, input_signal_length: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from nemo.core.classes.common import typecheck

        # NeMo's neural-type checks reject a Conformer used as adapter (it expects a spectrogram)
        # and cost host time on every call; shapes are checked by our own tests instead.
        encoder_dtype = next(self.encoder.parameters()).dtype
        features, feature_lens = self.mel_features(input_signal, input_signal_length)
        features = features.to(encoder_dtype)
        _match_buffer_dtypes(self.encoder, encoder_dtype)
        with typecheck.disable_checks():
            if self.spec_augmentation is not None and self.training:
                features = self.spec_augmentation(input_spec=features, length=feature_lens)
            encoded, encoded_lens = self.encoder(audio_signal=features, length=feature_lens)  # (B, D, T)
            encoded, encoded_lens = self.modality_adapter(audio_signal=encoded, length=encoded_lens)
        return self.proj(encoded.transpose(1, 2)), encoded_lens  # (B, T, H)


def conformer_frame_counts(encoder: nn.Module, feature_lens: torch.Tensor) -> torch.Tensor | None:
    """A NeMo ``ConformerEncoder``'s output lengths for ``feature_lens`` mel frames, by its own
    ``calc_length`` arithmetic (what its ``ConvSubsampling.forward`` computes); None where unknown."""
    from nemo.collections.asr.parts.submodules.subsampling import ConvSubsampling, calc_length

    if getattr(encoder, "reduction_subsampling", None) is not None:
        return None
    pre_encode = getattr(encoder, "pre_encode", None)
    if isinstance(pre_encode, ConvSubsampling):
        feature_lens = calc_length(
            feature_lens,
            all_paddings=pre_encode._left_padding + pre_encode._right_padding,
            kernel_size=pre_encode._kernel_size,
            stride=pre_encode._stride,
            ceil_mode=pre_encode._ceil_mode,
            repeat_num=pre_encode._sampling_num,
        )
    elif not isinstance(pre_encode, nn.Linear):  # a Linear keeps the frame count
        return None
    return feature_lens.to(torch.int64)


def _match_buffer_dtypes(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating buffers (the Conformer's positional table ``pos_enc.pe``) to the weights' dtype.

    DeepSpeed's bf16 engine casts parameters only: the fp32 ``pe`` made at construction would
    promote the activations back to fp32 and the next bf16 Linear fails (NeMo rebuilds ``pe`` in
    the weights' dtype only when a longer input arrives).
    """
    for owner in module.modules():
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(owner, name, buffer.to(dtype))


def _unpin_featurizer_forward(preprocessor: nn.Module) -> None:
    """Drop the ``forward`` NeMo's ``FilterbankFeatures`` stores on the instance (``no_grad`` around its
    own bound method), so the class's ``forward`` runs.

    Why: that attribute is bound to the object it was made on, and ``copy.deepcopy`` copies functions
    by reference. A deep copy of the SALM then computed its mel features with the original's
    featurizer, its buffers and its train/eval mode (a ``.cuda()`` copy failed on the original's CPU
    filterbank). The preprocessor's ``forward`` runs under ``no_grad`` already.
    """
    featurizer = getattr(preprocessor, "featurizer", None)
    if featurizer is not None and "forward" in vars(featurizer):
        del featurizer.forward
