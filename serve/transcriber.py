"""The model deployment: one SALM per replica, requests batched by how much audio they carry.

Replicas receive float waveforms already decoded and split by the ingress (``TranscriptionJob``),
never bytes or paths. ``@serve.batch`` groups jobs until their audio adds up to
``max_batch_audio_s`` (via ``batch_size_fn``) or ``batch_wait_timeout_s`` passes; all pieces of
one long recording travel as one job, so they are always transcribed in the same batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from ray import serve

from salm.errors import PromptError
from serve.audio import AudioTooLongError
from serve.metrics import TranscriberMetrics

GAUGE_REFRESH_S = 5.0
logger = logging.getLogger("ray.serve")
MERGEABLE_BATCHES = 256  # Serve batches admitted at once so that they can be merged (see transcribe_batch)


@dataclass(frozen=True)
class TranscriptionJob:
    """One request's audio after decoding: its pieces (cut at quiet points) and how to prompt them.

    ``prompt`` is what the client sent: ``None`` for the model's default instruction, text with the
    audio placeholder to replace the instruction, or text without it to go before the instruction.
    ``temperature`` 0 means greedy decoding.
    """

    pieces: list[np.ndarray]
    sampling_rate: int
    prompt: str | None = None
    temperature: float = 0.0

    @property
    def audio_s(self) -> float:
        return sum(len(piece) for piece in self.pieces) / self.sampling_rate


@dataclass(frozen=True)
class PieceResult:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class BatchingConfig:
    """The transcriber's ``user_config`` in ``serve/config.yaml``; changing it needs no restart."""

    max_batch_audio_s: int = 640
    batch_wait_timeout_s: float = 0.05
    max_new_tokens: int = 128
    # torch.compile the greedy decoding step (GPU only; the replica compiles for 1-3 min at start).
    # serve/config.yaml turns it on; a replica deployed without a user_config decodes eagerly.
    compile_decoding: bool = False
    # torch.compile each Conformer layer (GPU only; ~30 s once per replica start): the encoder's time
    # for a batch of 256 x 10 s fell 0.243 -> 0.175 s on an H200, 64 x 10 s 0.070 -> 0.053 s
    # (BENCHMARKS.md). serve/config.yaml turns it on; off, the encoder runs eagerly.
    compile_encoder: bool = False
    # torch.compile the greedy decoder's prefill, the LLM over the prompts (GPU only; ~3 min once per
    # replica start on an H100): +11% RTFx at batch 128-256, +5-10% at 1-64 (BENCHMARKS.md).
    # serve/config.yaml turns it on; off, the prefill runs eagerly.
    compile_prefill: bool = False
    # GPU: clip lengths (s) whose decoders a replica captures at start, for every batch size that
    # batches of such clips can take, so that no request waits for a capture. Empty: capture on demand.
    warm_up_clip_s: tuple[float, ...] = ()
    # Serve with the encoder layout the model was trained with (`perception.channels_last_subsampling`,
    # `pad_attention_keys_to`; same numbers). Off: NCHW subsampling and NeMo's T keys, since with the
    # canary recipe's layout each new clip length cost its first request 0.3-0.6 s on an H200 and a
    # 64-client load ran 1.7x slower (BENCHMARKS.md, "the encoder layout options").
    keep_encoder_layout: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_audio_s < 1:
            raise ValueError(f"`user_config.max_batch_audio_s` must be >= 1, got {self.max_batch_audio_s}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(
                f"`user_config.batch_wait_timeout_s` must be >= 0, got {self.batch_wait_timeout_s}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"`user_config.max_new_tokens` must be >= 1, got {self.max_new_tokens}")
        for switch in ("compile_decoding", "compile_encoder", "compile_prefill", "keep_encoder_layout"):
            value = getattr(self, switch)
            if not isinstance(value, bool):
                raise ValueError(f"`user_config.{switch}` must be true or false, got {value!r}")
        lengths = self.warm_up_clip_s
        if not isinstance(lengths, list | tuple) or not all(
            isinstance(s, int | float) and not isinstance(s, bool) and 0 < s <= self.max_batch_audio_s
            for s in lengths
        ):
            raise ValueError(
                "`user_config.warm_up_clip_s` must be a list of clip lengths in seconds, each > 0 and "
                f"<= max_batch_audio_s ({self.max_batch_audio_s}), e.g. [10, 20]; got {lengths!r}"
            )
        object.__setattr__(self, "warm_up_clip_s", tuple(float(s) for s in lengths))


def warm_up_batch_sizes(
    clip_s: float, max_batch_audio_s: int, max_requests: int, compile_step: bool
) -> list[int]:
    """The decoder batch sizes that batches of ``clip_s`` clips can use: ``padded_batch_size`` of every
    count from one clip up to what the audio budget and the replica's request limit let a batch hold."""
    from salm.model.decoding import padded_batch_size

    most = max(1, min(int(max_batch_audio_s // clip_s), max_requests))
    return sorted({padded_batch_size(count, compile_step) for count in range(1, most + 1)})


def serve_encoder_layout(model, keep_encoder_layout: bool) -> None:
    """Set ``model``'s encoder to the layout a replica serves with: the model's own with
    ``keep_encoder_layout``, else inference's (NCHW subsampling, NeMo's T keys)."""
    from salm.model.perception import INFERENCE_ENCODER_LAYOUT, configured_encoder_layout

    if keep_encoder_layout:
        layout = configured_encoder_layout(model.cfg.perception)
    else:
        layout = INFERENCE_ENCODER_LAYOUT
    model.perception.set_encoder_layout(**layout)


def batch_audio_seconds(jobs: list[TranscriptionJob]) -> int:
    """``@serve.batch``'s size of a batch: its audio seconds, rounded up (the budget is an int)."""
    return math.ceil(sum(job.audio_s for job in jobs))


def missing_gpu_warning(device: str, cluster_gpus: float) -> str | None:
    """Why a replica runs on the CPU of a cluster that has GPUs, and what to change (else None).

    A deployment's ``ray_actor_options`` in the Serve config file replace the ones the code sets
    (Ray Serve does not merge them), so setting e.g. only ``num_cpus`` there drops the GPU.
    """
    if device != "cpu" or cluster_gpus <= 0:
        return None
    return (
        f"this Transcriber replica has no GPU although the cluster has {cluster_gpus:g}: it will transcribe "
        "on the CPU, slowly. If serve/config.yaml sets `ray_actor_options` for the Transcriber, they replace "
        "the ones serve/app.py sets: add `num_gpus: 1` there"
    )


@serve.deployment(name="Transcriber")
class Transcriber:
    """Loads the model once per replica, then turns batches of jobs into transcripts.

    ``__init__`` is async (Serve supports it) so that the gauge refresher runs on the replica's loop.
    """

    async def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto") -> None:
        import torch

        from salm.model import SALM

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        warning = missing_gpu_warning(device, _cluster_gpus())
        if warning:
            logger.warning(warning)
        from salm.generate import ready_for_inference
        from salm.io.nemo_file import merge_lora_into_llm

        # bf16 on a GPU unless told otherwise, the mel front end fp32; reconfigure sets the layout
        model = ready_for_inference(SALM.from_pretrained(model_path), device, dtype)
        # A replica never trains or saves: LoRA folded into the LLM weights drops the adapter matmuls
        # from every prefill and decoding step (bench/serve_throughput.py, variant merged_lora).
        self.model = merge_lora_into_llm(model)
        self.default_prompt = self.model.default_prompt
        self.config = BatchingConfig()
        self.metrics = TranscriberMetrics()
        self._waiting = 0
        self._last_rtfx: float | None = None
        self._recent_batch_requests: deque[int] = deque(maxlen=4096)
        self._recent_batch_seconds: deque[float] = deque(maxlen=4096)
        self._recent_model_wait_s: deque[float] = deque(maxlen=4096)  # one per request
        # Serve batches waiting for the model: their jobs, their future and when they were queued
        self._pending: deque[tuple[list[TranscriptionJob], asyncio.Future, float]] = deque()
        self._model_lock = asyncio.Lock()
        self._gauge_task = asyncio.get_running_loop().create_task(self._refresh_gauges())

    def reconfigure(self, user_config: dict) -> None:
        self.config = BatchingConfig(**user_config)
        self._apply_encoder_layout()  # before the warm-up, which runs the encoder as requests will
        on_gpu = self.model.device.type == "cuda"  # CPUs decode eagerly: nothing to compile or capture
        newly_compiled = self.config.compile_decoding and not self.model.compile_decoding
        self.model.compile_decoding = self.config.compile_decoding
        # The prefill's switch is turned on by its own compile below, not here: the decoding step's
        # warm-up call would otherwise compile it too, inside the step's compile and its timing.
        wants_compiled_prefill = on_gpu and self.config.compile_prefill  # GPU only, as decoding
        newly_compiled_prefill = wants_compiled_prefill and not self.model.compile_prefill
        if not wants_compiled_prefill:
            self.model.compile_prefill = False
        if on_gpu:  # the compiled layers guard on the layout: compile after choosing it
            self._compile_encoder(self.config.compile_encoder)
        if newly_compiled and on_gpu:
            self._compile_decoding_now()
        if newly_compiled_prefill:
            self._compile_prefill_now()
        if self.config.warm_up_clip_s and on_gpu:
            self._warm_up_decoders(_max_ongoing_requests())
        self.transcribe_batch.set_max_batch_size(self.config.max_batch_audio_s)
        self.transcribe_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    def _apply_encoder_layout(self) -> None:
        serve_encoder_layout(self.model, self.config.keep_encoder_layout)

    def _compile_encoder(self, wanted: bool) -> None:
        """Compile the Conformer layers (``compile_encoder``) before the first request, or run them
        eagerly again when it is turned off (``salm.inference_compile.compile_encoder_now``).

        Its warm-up calls run at every reconfigure: milliseconds when the graphs hold, and a
        recompile here, not in a request, when a new ``keep_encoder_layout`` changed what the graphs
        were built for. If compiling fails, the layers run eagerly and the replica says why.
        """
        from salm.inference_compile import compile_encoder_now
        from salm.model.compile import encoder_layers, is_compiled, uncompile_layers

        layers = encoder_layers(self.model)
        if not wanted:
            uncompile_layers(layers)
            return
        if layers and not all(is_compiled(layer) for layer in layers):
            logger.info("compiling the encoder's Conformer layers (compile_encoder: true), once per replica")
        started = time.perf_counter()
        failure = compile_encoder_now(self.model, self.default_prompt)
        if failure is not None:
            logger.warning(
                f"compiling the encoder failed ({failure}); this replica runs it "
                "eagerly (slower at large batches, same transcripts). Fix the cause, or set "
                "`Transcriber.user_config.compile_encoder: false` to skip the attempt"
            )
            return
        if layers:
            logger.info(f"compiled encoder layers ready in {time.perf_counter() - started:.1f} s")

    def _compile_decoding_now(self) -> None:
        """Compile the decoding step before the first request instead of during it
        (``salm.inference_compile.compile_decoding_now``; 134 s on an H200, once per replica)."""
        from salm.inference_compile import compile_decoding_now

        self._compile_before_requests(
            "compile_decoding", "the greedy decoding step", compile_decoding_now, "slower per token"
        )

    def _compile_prefill_now(self) -> None:
        """Compile the prefill before the first request instead of during it
        (``salm.inference_compile.compile_prefill_now``; 90-172 s on two H100s, once per replica)."""
        from salm.inference_compile import compile_prefill_now

        self._compile_before_requests(
            "compile_prefill", "the prefill", compile_prefill_now, "slower at large batches"
        )

    def _compile_before_requests(self, switch: str, part: str, compile_now, eager_cost: str) -> None:
        """Run ``compile_now`` (one of ``salm.inference_compile``'s) and log how long it took. If
        compiling fails (e.g. an image without the C compiler Triton needs), the replica says why
        and runs that part eagerly rather than failing every request."""
        logger.info(f"compiling {part} ({switch}: true), once per replica")
        started = time.perf_counter()
        failure = compile_now(self.model, self.config.max_new_tokens)
        if failure is not None:
            logger.warning(
                f"compiling {part} failed ({failure}); this replica runs it uncompiled ({eager_cost}, "
                f"same transcripts). Fix the cause, or set `Transcriber.user_config.{switch}: false` "
                "to skip the attempt"
            )
            return
        logger.info(f"{part} compiled in {time.perf_counter() - started:.0f} s")

    def _warm_up_decoders(self, max_requests: int) -> None:
        """Capture the decoders of ``warm_up_clip_s`` batches before the first request needs them.

        Each new batch size or cache length means a KV cache and a CUDA graph capture (0.1-1 s on
        an H200), paid inside the request that first brings it: 5 of them fell inside a 64-client
        load test without the warm-up, 1 with it (BENCHMARKS.md). So the replica transcribes silence
        of each length at every batch size such a batch can take (``warm_up_batch_sizes``; a request
        is one clip here). Decoders already held are reused, so a later ``user_config`` change
        costs seconds. It stops, with a warning, once the decoder cache (a quarter of the GPU)
        drops a decoder it captured; a failure is logged and the replica serves, capturing on demand.
        """
        started = time.perf_counter()
        before = held = self.model.decoder_cache_stats()
        try:
            for clip_s in self.config.warm_up_clip_s:
                silence = np.zeros(round(clip_s * self.model.sampling_rate), dtype=np.float32)
                sizes = warm_up_batch_sizes(
                    clip_s, self.config.max_batch_audio_s, max_requests, self.model.compile_decoding
                )
                for rows in sizes:
                    self.model.transcribe([silence] * rows, max_new_tokens=self.config.max_new_tokens)
                    now = self.model.decoder_cache_stats()
                    if now["misses"] > held["misses"] and now["entries"] <= held["entries"]:
                        logger.warning(
                            f"the decoder cache is full at {rows} rows of {clip_s:g} s clips "
                            f"({now['bytes'] / 1e9:.1f} GB of KV cache): stopping the warm-up here, larger "
                            "batches capture on demand. Shorten `user_config.warm_up_clip_s`"
                        )
                        return
                    held = now
        except Exception as error:  # e.g. out of memory: serve anyway, capturing on demand
            logger.warning(
                f"warming up the decoders failed ({type(error).__name__}: {error}); batch sizes not "
                "captured yet are captured by the first request that needs them"
            )
            return
        finally:
            after = self.model.decoder_cache_stats()
            logger.info(
                f"decoder warm-up for {list(self.config.warm_up_clip_s)} s clips: "
                f"{after['misses'] - before['misses']} captured in "
                f"{time.perf_counter() - started:.1f} s, {after['entries']} held "
                f"({after['bytes'] / 1e9:.1f} GB of KV cache)"
            )

    def info(self) -> dict:
        """What the ingress needs to prepare jobs; answering at all means the model is loaded."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "sampling_rate": self.model.sampling_rate,
            "max_batch_audio_s": self.config.max_batch_audio_s,
            "device": str(self.model.device),
        }

    def stats(self) -> dict:
        """Requests and model seconds per recent batch, for tests, the load generator and debugging
        (the same numbers feed the metrics): busy seconds over wall time says whether the model or
        the path in front of it limits throughput."""
        from salm.model.compile import encoder_layers, is_compiled

        layers = encoder_layers(self.model)
        return {
            "batch_requests": list(self._recent_batch_requests),
            "batch_seconds": list(self._recent_batch_seconds),
            "model_wait_s": list(self._recent_model_wait_s),
            "decoder_cache": self.model.decoder_cache_stats(),
            "compile_decoding": self.model.compile_decoding,
            "compile_prefill": self.model.compile_prefill,
            "compile_encoder": bool(layers) and all(is_compiled(layer) for layer in layers),
        }

    async def transcribe(self, job: TranscriptionJob) -> list[PieceResult]:
        """Transcribe one job's pieces (in one batch with whatever else is waiting)."""
        if job.audio_s > self.config.max_batch_audio_s:
            raise AudioTooLongError(
                f"the audio lasts {job.audio_s:.1f} s but one batch holds at most "
                f"{self.config.max_batch_audio_s} s on this server; send shorter audio"
            )
        self._prompt_text(job.prompt)  # a malformed prompt fails this request, not its whole batch
        self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        return await self.transcribe_batch(job)

    @serve.batch(
        max_batch_size=640,
        batch_wait_timeout_s=0.05,
        batch_size_fn=batch_audio_seconds,
        max_concurrent_batches=MERGEABLE_BATCHES,
    )
    async def transcribe_batch(self, jobs: list[TranscriptionJob]) -> list[list[PieceResult]]:
        """Run ``jobs`` on the model, merged with any other batches that formed while it was busy.

        Serve forms a batch every ``batch_wait_timeout_s`` even while the previous one is still
        running (it only queues them), so under load it makes many small batches; with a model
        that takes seconds per batch the average batch was ~2 requests at 16 in flight. Batches are
        therefore admitted concurrently and wait here; whoever gets the model next runs everything
        waiting, up to the audio budget, in one call.
        """
        done = asyncio.get_running_loop().create_future()
        self._pending.append((jobs, done, time.monotonic()))
        while not done.done():
            async with self._model_lock:
                if not done.done():
                    await self._run_pending()
        return done.result()

    async def _run_pending(self) -> None:
        taken, audio_s = [], 0.0
        while self._pending and (
            not taken or audio_s + batch_audio_seconds(self._pending[0][0]) <= self.config.max_batch_audio_s
        ):
            taken.append(self._pending.popleft())
            audio_s += batch_audio_seconds(taken[-1][0])
        jobs = [job for batch, _, _ in taken for job in batch]
        self._waiting -= len(jobs)
        self.metrics.queue_depth.set(self._waiting)
        now = time.monotonic()
        for batch, _, queued_at in taken:
            for _ in batch:
                self._recent_model_wait_s.append(now - queued_at)
                self.metrics.model_wait_s.observe(now - queued_at)
        try:
            # In a thread: the replica's event loop keeps answering health checks and queueing requests.
            results = await asyncio.to_thread(self._run_batch, jobs)
        except BaseException as error:  # also cancellation: no taken request may be left waiting
            failure = error if isinstance(error, Exception) else RuntimeError("the batch was cancelled")
            for _, done, _ in taken:
                if not done.done():
                    done.set_exception(failure)
            if not isinstance(error, Exception):
                raise
            return
        start = 0
        for batch, done, _ in taken:
            done.set_result(results[start : start + len(batch)])
            start += len(batch)

    def _run_batch(self, jobs: list[TranscriptionJob]) -> list[list[PieceResult]]:
        started = time.perf_counter()
        results: list[list[PieceResult | None]] = [[None] * len(job.pieces) for job in jobs]
        # One generate call per temperature: sampling settings are per call, prompts per example.
        by_temperature: dict[float, list[tuple[int, int]]] = {}
        for j, job in enumerate(jobs):
            for p in range(len(job.pieces)):
                by_temperature.setdefault(job.temperature, []).append((j, p))
        for temperature, members in by_temperature.items():
            prompts = [
                [{"role": "user", "content": self._prompt_text(jobs[j].prompt), "audio": jobs[j].pieces[p]}]
                for j, p in members
            ]
            output = self.model.generate(
                prompts,
                max_new_tokens=self.config.max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else 1.0,
            )
            for (j, p), text, token_ids in zip(members, output.texts, output.token_ids, strict=True):
                results[j][p] = PieceResult(text=text, token_ids=token_ids)
        self._record(jobs, time.perf_counter() - started)
        return results

    def _prompt_text(self, prompt: str | None) -> str:
        if not prompt:
            return self.default_prompt
        tag = self.model.audio_locator_tag
        count = prompt.count(tag)
        if count > 1:
            raise PromptError(f"the prompt holds {count} {tag} placeholders; use at most one (for the audio)")
        return prompt if count == 1 else f"{prompt} {self.default_prompt}"

    def _record(self, jobs: list[TranscriptionJob], elapsed_s: float) -> None:
        audio_s = sum(job.audio_s for job in jobs)
        self._recent_batch_requests.append(len(jobs))
        self._recent_batch_seconds.append(elapsed_s)
        self.metrics.batch_requests.observe(len(jobs))
        self.metrics.batch_audio_s.observe(audio_s)
        self.metrics.audio_s.inc(audio_s)
        self.metrics.compute_s.inc(elapsed_s)
        self._last_rtfx = audio_s / max(elapsed_s, 1e-9)
        self.metrics.rtfx.set(self._last_rtfx)

    async def _refresh_gauges(self) -> None:
        """Ray exports a gauge only in the windows in which it was set: re-set them so they never vanish."""
        while True:
            self.metrics.queue_depth.set(self._waiting)
            if self._last_rtfx is not None:
                self.metrics.rtfx.set(self._last_rtfx)
            await asyncio.sleep(GAUGE_REFRESH_S)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def _max_ongoing_requests() -> int:
    """The most requests this replica holds at once (its deployment's ``max_ongoing_requests``): no
    batch has more. Ray keeps it in the replica context's private deployment config; unbounded if absent."""
    config = getattr(serve.get_replica_context(), "_deployment_config", None)
    return int(getattr(config, "max_ongoing_requests", None) or 1 << 20)
