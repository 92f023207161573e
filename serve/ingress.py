"""The HTTP front door (CPU): OpenAI-style routes, auth, size limits, decoding, and 4xx for bad input.

Everything a client can get wrong is caught here with a status code and a message that says what
to change, so transcriber replicas only ever receive float audio. Uploads are read from the
request body only; no route opens a path the client names.

Routes: ``POST /v1/audio/transcriptions`` (OpenAI's multipart API), ``POST /transcribe`` (JSON,
base64 audio, several clips per call), ``GET /v1/models``, ``GET /healthz``, ``GET /readyz``.
"""

# No `from __future__ import annotations` here: Serve's ingress rebinds these methods and FastAPI
# must see real annotation objects to tell form fields and bodies from query parameters.
import asyncio
import base64
import binascii
import hmac
import os
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from salm.errors import PromptError
from serve import responses
from serve.audio import AudioTooLongError, BadAudioError, decode_audio, split_at_quiet_points
from serve.metrics import IngressMetrics
from serve.transcriber import PieceResult, TranscriptionJob

PUBLIC_PATHS = {"/healthz", "/readyz"}  # probes work without the API key
ROUTES = {"/v1/audio/transcriptions", "/transcribe", "/v1/models", "/healthz", "/readyz"}
READY_TIMEOUT_S = 5.0
MAX_PROMPT_CHARS = 4000
MAX_CLIPS_PER_CALL = 64


@dataclass(frozen=True)
class IngressSettings:
    """Limits and identity of the endpoint (from the application's ``args`` in ``serve/config.yaml``)."""

    model_name: str
    max_upload_bytes: int
    max_audio_s: float
    max_chunk_s: float
    api_key_env: str | None = None
    retry_after_s: int = 5

    def api_key(self) -> str | None:
        """The token lives in the replica's environment (runtime_env, a Kubernetes secret), never in the config."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None


class ApiError(Exception):
    """A refused request: its HTTP status, a metric reason and a message for the user."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


class TranscribeRequest(BaseModel):
    """``POST /transcribe``: base64-encoded audio files (any supported format), transcribed together."""

    model_config = ConfigDict(extra="forbid")  # e.g. a `path` field is refused, not silently ignored
    audios: list[str] = Field(min_length=1, max_length=MAX_CLIPS_PER_CALL)
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)


api = FastAPI(title="salm-ray transcription", version="1")


def error_response(request: Request, error: ApiError) -> JSONResponse:
    """OpenAI's error shape, so the ``openai`` client raises with our message."""
    metrics: IngressMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejected.inc(tags={"reason": error.reason})
    body = {"error": {"message": error.message, "type": "invalid_request_error", "code": error.reason}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(request, error)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e['loc'] if part != 'body')}: {e['msg']}" for e in error.errors()
    )
    return error_response(request, ApiError(422, "invalid_request", f"invalid request: {problems}"))


@api.middleware("http")
async def guard(request: Request, call_next) -> Response:
    """Auth and the body-size limit run before the body is read; every response's latency is recorded."""
    started = time.perf_counter()
    settings: IngressSettings = request.app.state.settings
    response = _refuse_early(request, settings)
    if response is None:
        response = await call_next(request)
    route = request.url.path if request.url.path in ROUTES else "other"
    request.app.state.metrics.latency_s.observe(
        time.perf_counter() - started, tags={"route": route, "status": str(response.status_code)}
    )
    return response


def _refuse_early(request: Request, settings: IngressSettings) -> Response | None:
    key = settings.api_key()
    if key and request.url.path not in PUBLIC_PATHS:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return error_response(
                request,
                ApiError(
                    401,
                    "unauthorized",
                    "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                    {"WWW-Authenticate": "Bearer"},
                ),
            )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes:
        return error_response(request, _too_large(settings))
    return None


def _too_large(settings: IngressSettings) -> ApiError:
    return ApiError(
        413,
        "too_large",
        f"the request body is over this server's limit of {settings.max_upload_bytes / 2**20:g} MiB; "
        "send a smaller or compressed (flac, mp3, ogg) file",
    )


def _which(index: int, clips: list[bytes]) -> str:
    return f"audios[{index}]: " if len(clips) > 1 else ""


# Everything the class uses must be defined above it: `@serve.deployment` pickles the class as soon
# as it is defined, with the module globals that exist at that moment.
@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """Validates and decodes requests, sends float audio to the transcriber, renders the answer."""

    def __init__(self, transcriber: DeploymentHandle, settings: IngressSettings) -> None:
        self.transcriber = transcriber
        self.settings = settings
        self._sampling_rate: int | None = None
        self._info_lock = asyncio.Lock()
        self._created = int(time.time())
        api.state.settings = settings
        api.state.metrics = IngressMetrics()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: this process answers (the model may still be loading)."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: a transcriber replica with its model loaded answers within a few seconds."""
        try:
            info = await asyncio.wait_for(self.transcriber.info.remote(), READY_TIMEOUT_S)
        except Exception as error:  # timeout, no replica yet, replica starting
            return JSONResponse(
                {"ready": False, "reason": f"transcriber not ready: {type(error).__name__}"}, status_code=503
            )
        return JSONResponse({"ready": True, "model": self.settings.model_name, "device": info["device"]})

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.settings.model_name,
                    "object": "model",
                    "created": self._created,
                    "owned_by": "salm-ray",
                }
            ],
        }

    @api.post("/v1/audio/transcriptions", response_model=None)
    async def create_transcription(
        self,
        file: Annotated[UploadFile, File(description="the audio file: wav, flac, mp3 or ogg, any rate")],
        model: Annotated[str, Form(description="any name; this server serves one model (see /v1/models)")],
        prompt: Annotated[str | None, Form(max_length=MAX_PROMPT_CHARS)] = None,
        response_format: Annotated[responses.ResponseFormat, Form()] = "json",
        temperature: Annotated[float, Form(ge=0.0, le=2.0)] = 0.0,
        language: Annotated[str | None, Form(max_length=32)] = None,
        stream: Annotated[bool, Form()] = False,
    ) -> Response:
        """OpenAI's transcription API; the official ``openai`` client works against it unchanged."""
        if stream:
            raise ApiError(400, "invalid_request", "streaming is not supported; omit `stream`")
        data = await file.read()
        if len(data) > self.settings.max_upload_bytes:  # chunked uploads carry no Content-Length
            raise _too_large(self.settings)
        transcript = (await self._transcribe([data], prompt, temperature, language or "english"))[0]
        if response_format == "text":
            return PlainTextResponse(transcript.text)
        if response_format == "srt":
            return PlainTextResponse(responses.as_srt(transcript))
        if response_format == "vtt":
            return PlainTextResponse(responses.as_vtt(transcript), media_type="text/vtt")
        if response_format == "verbose_json":
            return JSONResponse(responses.as_verbose_json(transcript))
        return JSONResponse(responses.as_json(transcript))

    @api.post("/transcribe")
    async def transcribe_json(self, body: TranscribeRequest) -> dict:
        """JSON in, JSON out: several base64 clips per call, batched with everything else in flight."""
        clips = []
        for index, encoded in enumerate(body.audios):
            try:
                clips.append(base64.b64decode(encoded, validate=True))
            except (binascii.Error, ValueError) as error:
                raise ApiError(
                    400,
                    "bad_audio",
                    f"audios[{index}] is not valid base64 ({error}); send the file's bytes base64-encoded",
                ) from error
        transcripts = await self._transcribe(clips, body.prompt, body.temperature, "english")
        return {
            "model": self.settings.model_name,
            "results": [responses.as_verbose_json(t) for t in transcripts],
        }

    async def _transcribe(
        self, clips: list[bytes], prompt: str | None, temperature: float, language: str
    ) -> list[responses.Transcript]:
        sampling_rate = await self._model_sampling_rate()
        jobs = []
        for index, data in enumerate(clips):
            try:
                samples = await asyncio.to_thread(
                    decode_audio, data, sampling_rate, self.settings.max_audio_s
                )
            except BadAudioError as error:
                raise ApiError(400, "bad_audio", _which(index, clips) + str(error)) from error
            except AudioTooLongError as error:
                raise ApiError(413, "too_long", _which(index, clips) + str(error)) from error
            spans = split_at_quiet_points(samples, sampling_rate, self.settings.max_chunk_s)
            jobs.append(
                (
                    spans,
                    TranscriptionJob([samples[a:b] for a, b in spans], sampling_rate, prompt, temperature),
                )
            )
        results = await asyncio.gather(*(self._submit(job) for _, job in jobs))
        return [
            responses.Transcript(
                segments=[
                    responses.Segment(a / sampling_rate, b / sampling_rate, piece.text, piece.token_ids)
                    for (a, b), piece in zip(spans, pieces, strict=True)
                ],
                duration=job.audio_s,
                temperature=temperature,
                language=language,
            )
            for (spans, job), pieces in zip(jobs, results, strict=True)
        ]

    async def _submit(self, job: TranscriptionJob) -> list[PieceResult]:
        try:
            return await self.transcriber.transcribe.remote(job)
        except (BackPressureError, DeploymentUnavailableError) as error:
            retry_after = getattr(error, "retry_after_s", None) or self.settings.retry_after_s
            raise ApiError(
                503,
                "overloaded",
                "the server is at capacity (its request queue is full); retry after the Retry-After delay",
                {"Retry-After": str(int(retry_after))},
            ) from error
        except AudioTooLongError as error:
            raise ApiError(413, "too_long", str(error)) from error
        except PromptError as error:
            raise ApiError(400, "invalid_request", str(error)) from error
        except Exception as error:  # the replica survives (it raised); this request alone fails
            raise ApiError(
                500,
                "failed",
                f"transcription failed: {type(error).__name__}; see the Transcriber replica's log",
            ) from error

    async def _model_sampling_rate(self) -> int:
        """Asked once from a transcriber replica, so the ingress resamples to what the model expects."""
        async with self._info_lock:  # concurrent first requests make one call, not one each
            if self._sampling_rate is None:
                info = await self.transcriber.info.remote()
                self._sampling_rate = int(info["sampling_rate"])
        return self._sampling_rate
