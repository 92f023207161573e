"""SALM: speech encoder frames spliced into a decoder-only LLM's input, trained on transcripts.

Data flow of one step (shapes where they change)::

    audios (N, S) --perception--> audio frames (N, L, H)
    input_ids (B, T) --embed_tokens--> (B, T, H) --replace_placeholders--> (B, T', H)
    (B, T', H) --LLM--> hidden (B, T', H) --lm_head at target positions only--> loss

Parameter names and config fields are NeMo SALM's, so canary-qwen-2.5b checkpoints load as-is
and what we save loads in NeMo. Unlike NeMo's LightningModule this is a plain ``nn.Module``:
the training loop, process groups and precision belong to Ray Train + DeepSpeed.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import GenerationConfig

from salm.audio import collate_audio, load_audio
from salm.errors import PromptError, SALMConfigError
from salm.model.batch_layout import BatchLayout, batch_layout
from salm.model.config import asr_prompt, model_config, trainable_patterns
from salm.model.decoding import (
    DecoderCache,
    GreedyDecoder,
    attention_on_kv_heads,
    cache_length,
    padded_batch_size,
    weight_pointers,
)
from salm.model.freezing import apply_freezing
from salm.model.llm import base_causal_lm, embedding_inside, install_lora, load_llm, validate_lora
from salm.model.packing import pack_sequences, packed_attention_in
from salm.model.perception import AudioPerception
from salm.model.placeholders import IGNORE_INDEX, gather_target_positions, replace_placeholders
from salm.text.prompt_formats import get_prompt_format
from salm.text.tokenizer import load_tokenizer, padding_id

AudioInput = str | Path | np.ndarray | torch.Tensor
PROMPT_CACHE_SIZE = 1024  # distinct prompt texts remembered by ``_encoded_prompt``


@dataclass
class GenerationResult:
    """What ``SALM.generate`` returns: new token ids per prompt (EOS and after removed) and text."""

    token_ids: list[list[int]]
    texts: list[str]


class SALM(nn.Module):
    """Speech-Augmented Language Model with NeMo SALM's structure and config vocabulary."""

    def __init__(self, cfg: dict | DictConfig) -> None:
        super().__init__()
        self.cfg = model_config(cfg)
        cfg = self.cfg
        self.audio_locator_tag: str = cfg.audio_locator_tag
        self.tokenizer = load_tokenizer(cfg.tokenizer_path or cfg.pretrained_llm, cfg.audio_locator_tag)
        self.prompt_format = get_prompt_format(cfg.prompt_format, self.tokenizer)

        llm = load_llm(cfg.pretrained_llm, pretrained_weights=bool(cfg.pretrained_weights))
        if len(self.tokenizer) > llm.config.vocab_size:
            raise SALMConfigError(
                f"the tokenizer has {len(self.tokenizer)} tokens (with {cfg.audio_locator_tag}) but the LLM's "
                f"vocab_size is {llm.config.vocab_size}; use an LLM config with a larger vocab_size"
            )
        # Held outside the LLM (as NeMo does): key ``embed_tokens.weight``, untouched by LLM sharding.
        self.embed_tokens: nn.Embedding = llm.model.embed_tokens
        del llm.model.embed_tokens
        if cfg.get("lora"):
            llm = install_lora(llm, self.embed_tokens, validate_lora(cfg.lora))
        self.llm = llm

        hidden_size = llm.config.hidden_size
        perception_cfg = OmegaConf.merge(
            cfg.perception, {"output_dim": cfg.perception.get("output_dim") or hidden_size}
        )
        if perception_cfg.output_dim != hidden_size:
            raise SALMConfigError(
                f"`model.perception.output_dim` is {perception_cfg.output_dim} but the LLM hidden size is {hidden_size}"
            )
        if cfg.pretrained_asr and cfg.pretrained_weights:
            from salm.io.nemo_asr import perception_config_from_asr

            perception_cfg = perception_config_from_asr(cfg.pretrained_asr, perception_cfg)
        # Saved models must rebuild this perception without the ASR file, and NeMo needs output_dim set.
        cfg.perception = perception_cfg
        self.perception = AudioPerception(perception_cfg)
        if cfg.pretrained_asr and cfg.pretrained_weights:
            from salm.io.nemo_asr import load_asr_weights

            load_asr_weights(self.perception, cfg.pretrained_asr)
        apply_freezing(self, list(cfg.freeze_params), trainable_patterns(cfg))
        self._decoders = DecoderCache()  # captured greedy decoders, reused across generate calls
        self._prompt_cache: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()  # _encoded_prompt
        # Greedy decoding on a GPU through the compiled step (decoding.compiled_step): faster per
        # token at every batch size measured (1-256, BENCHMARKS.md), but the first calls compile for
        # a minute or two. Set by servers, off by default.
        self.compile_decoding = False
        # The greedy decoder's prefill through one compiled trace of the LLM (decoding.compiled_prefill):
        # 1.5x on the LLM alone, +11% RTFx at batch 128-256 on an H100, but minutes of compiling at
        # the first call (BENCHMARKS.md). Set by servers (salm.inference_compile), off by default.
        self.compile_prefill = False
        # The loss runs the LLM on one packed row of the batch's real positions (salm.model.packing):
        # no compute on padding. Set by the training loop (trainer.pack_llm_sequences), off by default.
        self.pack_llm_sequences = False

    @classmethod
    def from_pretrained(
        cls, path: str | Path, llm_path: str | Path | None = None, tokenizer_path: str | Path | None = None
    ) -> SALM:
        """Load a saved SALM: a ``.nemo``, an HF-layout dir, a Ray Train checkpoint dir or a NeMo ``.ckpt``."""
        from salm.io.loading import load_pretrained

        return load_pretrained(path, llm_path=llm_path, tokenizer_path=tokenizer_path)

    def save_pretrained(self, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Save in the canary-qwen-2.5b HF layout (``config.json`` + ``model.safetensors`` + ``llm_backbone/``)."""
        from salm.io.hf_layout import save_hf_layout

        return save_hf_layout(self, out_dir, dtype=dtype)

    # ----- properties NeMo users know -----
    @property
    def default_prompt(self) -> str:
        """canary-qwen-2.5b's ASR prompt around this model's audio placeholder: what ``transcribe``
        and a Serve replica use when a request brings no prompt."""
        return asr_prompt(self.audio_locator_tag)

    @property
    def audio_locator_tag_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.audio_locator_tag)

    @property
    def text_pad_id(self) -> int:
        return padding_id(self.tokenizer)

    @property
    def text_eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def sampling_rate(self) -> int:
        return self.perception.sampling_rate

    @property
    def token_equivalent_duration(self) -> float:
        """Audio seconds per LLM position (0.08 s for canary-qwen-2.5b)."""
        return self.perception.token_equivalent_duration

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def train(self, mode: bool = True) -> SALM:
        """Like ``nn.Module.train`` but fully frozen parts stay in eval mode (no dropout, BN stats fixed)."""
        super().train(mode)
        for part in (self.perception.preprocessor, self.perception.encoder, self.llm):
            if mode and not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----- training -----
    def batch_layout(self, batch: dict) -> BatchLayout | None:
        """The host-side ``BatchLayout`` of a collated batch (``salm.model.batch_layout`` says why), or
        None when ``AudioPerception.frame_counts`` cannot predict this encoder's frame counts.

        Reads module attributes only: the training loop calls it from its prefetch thread.
        """
        frames = self.perception.frame_counts(batch["audio_lens"])
        if frames is None:
            return None
        return batch_layout(
            batch["input_ids"], batch["loss_mask"], frames, self.audio_locator_tag_id, self.text_pad_id
        )

    def prepare_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Batch (``audios``, ``audio_lens``, ``input_ids``, ``loss_mask``, optionally ``layout``) ->
        shifted LLM inputs and targets."""
        audio_embeds, audio_lens = self.perception(batch["audios"], batch["audio_lens"])  # (N, L, H)
        layout: BatchLayout | None = batch.get("layout")
        if layout is not None:  # checked on the device, without a wait (a GPU raises at its next sync)
            torch._assert_async(
                (audio_lens == layout.audio_frames).all(),
                "the batch layout's audio frame counts differ from the encoder's: "
                "AudioPerception.frame_counts does not model this encoder; please report it",
            )
        input_ids = batch["input_ids"]  # (B, T)
        text_embeds = self.embed_tokens(input_ids.masked_fill(input_ids == self.audio_locator_tag_id, 0))
        embeds, targets, attention_mask = replace_placeholders(
            input_ids=input_ids,
            embeds=text_embeds,
            audio_embeds=audio_embeds,
            audio_lens=audio_lens,
            placeholder_id=self.audio_locator_tag_id,
            padding_id=self.text_pad_id,
            target_ids=input_ids.masked_fill(~batch["loss_mask"], IGNORE_INDEX),
            placeholders=None if layout is None else (layout.placeholder_rows, layout.placeholder_cols),
            length=None if layout is None else layout.spliced_length,
        )
        return {
            "input_embeds": embeds[:, :-1],
            "attention_mask": attention_mask[:, :-1],
            "target_ids": targets[:, 1:],
            "audio_lens": audio_lens,
        }

    def forward(self, input_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary logits ``(B, T, V)`` for LLM input embeddings ``(B, T, H)``."""
        return self.llm(inputs_embeds=input_embeds, attention_mask=attention_mask, use_cache=False).logits

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum of cross-entropy over target tokens / number of target tokens (NeMo's definition).

        The LM head runs only at target positions: for ASR those are ~20% of the sequence, and the
        (B, T, vocab) logits tensor is the largest activation of the step otherwise.
        """
        inputs = self.prepare_inputs(batch)
        audio_lens = inputs.pop("audio_lens")
        layout: BatchLayout | None = batch.get("layout")
        causal_lm = base_causal_lm(self.llm)
        if self.pack_llm_sequences:
            packed = pack_sequences(
                inputs["input_embeds"],
                inputs["attention_mask"],
                inputs["target_ids"],
                real_positions=None if layout is None else layout.real_positions,
            )
            with packed_attention_in(causal_lm.model.config):
                hidden = causal_lm.model(
                    **packed.model_kwargs(), use_cache=False
                ).last_hidden_state  # (1, N, H)
            targets = packed.targets
            computed_positions = packed.targets.numel()
        else:
            # A copy, not prepare_inputs' slice: Dynamo guards on a view's base, so with compiled layers
            # the first Qwen3 layer would compile a graph of its own (tests/test_packing.py).
            hidden = causal_lm.model(
                inputs_embeds=inputs["input_embeds"].clone(),
                attention_mask=inputs["attention_mask"],
                use_cache=False,
            ).last_hidden_state  # (B, T', H)
            targets = inputs["target_ids"]
            computed_positions = inputs["attention_mask"].numel()
        target_positions = None
        if layout is not None:
            target_positions = (
                layout.packed_target_positions if self.pack_llm_sequences else layout.target_positions
            )
        at_targets, target_ids = gather_target_positions(hidden, targets, target_positions)
        logits = causal_lm.lm_head(at_targets)  # (num_targets, V)
        num_targets = (targets != IGNORE_INDEX).sum()
        loss = nn.functional.cross_entropy(logits.float(), target_ids, reduction="sum") / num_targets.clamp(
            min=1
        )
        predicted_ids = logits.argmax(dim=-1)  # (num_targets,) teacher-forced predictions
        return {
            "loss": loss,
            "num_target_tokens": num_targets,
            "correct_tokens": (predicted_ids == target_ids).sum(),
            "predicted_ids": predicted_ids.detach(),
            # (B,) splits predicted_ids per example (packed or not, they come in the batch's order)
            "targets_per_example": (inputs["target_ids"] != IGNORE_INDEX).sum(dim=1),
            "audio_frames": audio_lens.detach(),  # (N,) LLM positions each audio took
            "num_positions": inputs["attention_mask"].sum(),  # real (non-padding) LLM positions
            # the positions the LLM computed (all of them packed); a CPU scalar: no device sync
            "padded_positions": torch.tensor(computed_positions),
        }

    # ----- inference -----
    def encode_prompts(self, prompts: list[list[dict]]) -> tuple[torch.Tensor, list[AudioInput]]:
        """Chat prompts -> left-padded token ids ``(B, T)`` and the audios their turns carry, in order."""
        ids, audios = [], []
        for index, conversation in enumerate(prompts):
            conversation_audios = []
            for turn in conversation:
                turn_audio = turn.get("audio", [])
                conversation_audios += turn_audio if isinstance(turn_audio, (list, tuple)) else [turn_audio]
            input_ids, placeholders = self._encoded_prompt(
                [{k: v for k, v in t.items() if k != "audio"} for t in conversation]
            )
            if conversation_audios and placeholders != len(conversation_audios):
                raise PromptError(
                    f"prompt #{index} has {placeholders} {self.audio_locator_tag} placeholder(s) but "
                    f"{len(conversation_audios)} audio(s); put one placeholder in the text per audio"
                )
            ids.append(input_ids)
            audios += conversation_audios
        tokens = nn.utils.rnn.pad_sequence(
            ids, batch_first=True, padding_value=self.text_pad_id, padding_side="left"
        )
        return tokens, audios

    def _encoded_prompt(self, turns: list[dict]) -> tuple[torch.Tensor, int]:
        """Token ids of a prompt's text turns and its placeholder count, remembered per text.

        A server sends the same prompt with nearly every clip: tokenising 256 of them took 25-45 ms
        of a batch's host time (``bench/serve_throughput.py --phases``). Turns whose values cannot
        be hashed (NeMo's ``{"slots": {...}}`` form) are encoded every time.
        """
        try:
            key = tuple(tuple(sorted(turn.items())) for turn in turns)
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in self._prompt_cache:
            self._prompt_cache.move_to_end(key)
            return self._prompt_cache[key]
        input_ids = self.prompt_format.encode_dialog(turns).input_ids
        encoded = (input_ids, int((input_ids == self.audio_locator_tag_id).sum()))
        if key is not None:
            self._prompt_cache[key] = encoded
            if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                self._prompt_cache.popitem(last=False)
        return encoded

    def load_audios(self, audios: list[AudioInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Paths (decoded and resampled) or waveforms at the model's rate -> ``(N, S)`` and lengths."""
        clips = [load_audio(a, self.sampling_rate) if isinstance(a, (str, Path)) else a for a in audios]
        return collate_audio(clips)

    @torch.no_grad()
    def prepare_generation_inputs(
        self,
        prompts: list[list[dict]],
        audios: torch.Tensor | None = None,
        audio_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat prompts (+ audios) -> left-padded LLM input embeddings ``(B, T, H)`` and mask ``(B, T)``.

        The encoder runs once over all audios of the batch.
        """
        tokens, prompt_audios = self.encode_prompts(prompts)
        if prompt_audios and audios is not None:
            raise PromptError("give audios either inside the prompts or as `audios`, not both")
        if prompt_audios:
            audios, audio_lens = self.load_audios(prompt_audios)
        device = self.device
        tokens = tokens.to(device)
        text_embeds = self.embed_tokens(tokens.masked_fill(tokens == self.audio_locator_tag_id, 0))
        if audios is None:
            audio_lens = torch.zeros(0, dtype=torch.long)
            audio_embeds = text_embeds.new_zeros(0, 1, text_embeds.shape[-1])
        else:
            audio_embeds, audio_lens = self.perception(audios.to(device), audio_lens.to(device))
        embeds, _, attention_mask = replace_placeholders(
            tokens,
            text_embeds,
            audio_embeds,
            audio_lens.to(device),
            self.audio_locator_tag_id,
            self.text_pad_id,
        )
        return embeds, attention_mask

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[dict]],
        audios: torch.Tensor | None = None,
        audio_lens: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        synced_gpus: bool = False,
    ) -> GenerationResult:
        """Transcribe/answer a batch of chat prompts.

        Each prompt is a list of turns like NeMo's: ``{"role": "user", "content": "Transcribe the
        following: <|audioplaceholder|>", "audio": "clip.wav"}``; ``audio`` may be a path, a 1-D
        waveform at ``sampling_rate``, or a list of them. Alternatively give all audios as
        ``audios`` (N, S) + ``audio_lens``. The encoder runs once over the whole batch.
        Greedy decoding (the ASR default) runs our static-cache decoder, a replayed CUDA graph per
        token on a GPU in eval mode (``salm/model/decoding.py``); sampling and beam search go through
        ``transformers.generate``. ``synced_gpus`` keeps ranks stepping together when weights are
        sharded (ZeRO-3), which only ``transformers.generate`` does.
        """
        embeds, attention_mask = self.prepare_generation_inputs(prompts, audios, audio_lens)
        with torch.compiler.set_stance("force_eager"):  # see salm.model.compile: the LLM decodes eagerly
            if not do_sample and num_beams == 1 and not synced_gpus:
                generated = self._greedy_decode(embeds, attention_mask, max_new_tokens)
            else:
                config = GenerationConfig(
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=top_p if do_sample else None,
                    top_k=None,
                    num_beams=num_beams,
                    eos_token_id=self.text_eos_id,
                    pad_token_id=self.text_pad_id,
                    bos_token_id=None,
                )
                with embedding_inside(self.llm, self.embed_tokens):
                    generated = self.llm.generate(
                        inputs_embeds=embeds, attention_mask=attention_mask, generation_config=config
                    )
        token_ids = [_until_eos(row.tolist(), self.text_eos_id) for row in generated]
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
        return GenerationResult(token_ids=token_ids, texts=texts)

    def _greedy_decode(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """``(B, new)`` greedy token ids.

        On a GPU the batch is padded to ``padded_batch_size`` and the cache length rounded up
        (``cache_length``), so that calls of similar shapes replay one of a few captured decoders
        (``DecoderCache``) instead of capturing a new one.
        """
        batch, length, _ = embeds.shape
        max_len = cache_length(length, max_new_tokens)
        causal_lm = base_causal_lm(self.llm)
        parts = (causal_lm.model, causal_lm.lm_head, self.embed_tokens)

        with attention_on_kv_heads(causal_lm.model.config):
            return self._decode_with_cache(parts, embeds, attention_mask, max_len, max_new_tokens)

    def _decode_with_cache(
        self,
        parts: tuple[nn.Module, nn.Module, nn.Embedding],
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        max_len: int,
        max_new_tokens: int,
    ) -> torch.Tensor:
        batch = embeds.shape[0]

        def decode_eagerly() -> torch.Tensor:  # exact shapes, no padding, no graph
            decoder = GreedyDecoder(*parts, batch, max_len, max_new_tokens, False)
            self._prefill(decoder, embeds, attention_mask)
            return decoder.decode()

        if embeds.device.type != "cuda" or self.training:  # nothing to capture
            return decode_eagerly()
        rows = padded_batch_size(batch, self.compile_decoding)
        decoder = self._decoders.get(
            *parts,
            rows,
            max_len,
            max_new_tokens,
            weight_pointers(self.llm, self.embed_tokens),
            compile_step=self.compile_decoding,
        )
        self._prefill(decoder, embeds, attention_mask)  # real rows only
        try:
            return decoder.decode()[:batch]
        except RuntimeError as error:  # capture refused (an op that syncs), or compiling the step failed
            self._decoders.discard(decoder)
            if decoder.compile_step:
                # E.g. no C compiler for Triton. Stop compiling, so that later calls do not each pay a
                # failed compile, and decode with the uncompiled captured step (the same tokens).
                self.compile_decoding = False
                warnings.warn(
                    f"compiling the decoding step failed ({type(error).__name__}: {error}); "
                    "decoding with the uncompiled step from now on",
                    stacklevel=2,
                )
                return self._decode_with_cache(parts, embeds, attention_mask, max_len, max_new_tokens)
            warnings.warn(
                f"CUDA graph capture of the decoding step failed ({error}); decoding without graphs",
                stacklevel=2,
            )
            return decode_eagerly()

    def _prefill(self, decoder: GreedyDecoder, embeds: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """``decoder.prefill``, compiled when ``compile_prefill`` is on. A compile that fails (e.g. no
        C compiler for Triton) turns it off with a warning, once, and the eager prefill runs instead:
        the same tokens, slower."""
        if self.compile_prefill:
            try:
                decoder.prefill(embeds, attention_mask, self.text_eos_id, self.text_pad_id, compiled=True)
                return
            except RuntimeError as error:
                self.compile_prefill = False
                warnings.warn(
                    f"compiling the prefill failed ({type(error).__name__}: {error}); "
                    "prefilling eagerly from now on",
                    stacklevel=3,
                )
        decoder.prefill(embeds, attention_mask, self.text_eos_id, self.text_pad_id)

    def decoder_cache_stats(self) -> dict[str, float]:
        """Reuses and new captures of the greedy decoder (GPU), the KV cache bytes they hold, and
        the seconds the captures took (the first compiled capture includes the step's compile)."""
        return {
            "hits": self._decoders.hits,
            "misses": self._decoders.misses,
            "entries": len(self._decoders),
            "bytes": self._decoders.bytes(),
            "capture_s": round(self._decoders.capture_seconds(), 3),
        }

    def transcribe(self, audios: list[AudioInput], prompt: str | None = None, **generate_kwargs) -> list[str]:
        """One-liner ASR: the canary-qwen prompt around each audio; returns the texts."""
        prompt = prompt or self.default_prompt
        prompts = [[{"role": "user", "content": prompt, "audio": audio}] for audio in audios]
        return self.generate(prompts, **generate_kwargs).texts


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
