"""Talk to a running salm-ray server: ``TranscriptionClient(url).transcribe("clip.wav")``.

Any OpenAI client works too (``base_url=url + "/v1"``); this one adds the JSON batch route
(``/transcribe``: many clips in one call) and turns error responses into one readable exception.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx

API_KEY_ENV = "SALM_SERVE_API_KEY"
MAX_CLIPS_PER_CALL = 64  # the server's limit for /transcribe


class ServeRequestError(RuntimeError):
    """The server refused or failed a request; ``status`` is the HTTP code, the message is the server's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class TranscriptionClient:
    """Synchronous client; ``api_key`` defaults to the ``SALM_SERVE_API_KEY`` environment variable."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0) -> None:
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __enter__(self) -> TranscriptionClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def models(self) -> list[str]:
        return [model["id"] for model in self._checked(self._http.get("/v1/models")).json()["data"]]

    def ready(self) -> bool:
        """True once a transcriber replica has its model loaded."""
        return self._http.get("/readyz").status_code == 200

    def transcribe(
        self,
        audio: str | Path | bytes,
        model: str = "salm",
        prompt: str | None = None,
        temperature: float = 0.0,
        response_format: str = "json",
    ) -> str | dict:
        """One file through ``/v1/audio/transcriptions``: the text, or the whole JSON for verbose_json."""
        data, name = _read(audio)
        fields = {"model": model, "temperature": str(temperature), "response_format": response_format}
        if prompt is not None:
            fields["prompt"] = prompt
        response = self._checked(
            self._http.post("/v1/audio/transcriptions", files={"file": (name, data)}, data=fields)
        )
        if response_format == "verbose_json":
            return response.json()
        return response.json()["text"] if response_format == "json" else response.text

    def transcribe_many(
        self, audios: list[str | Path | bytes], prompt: str | None = None, temperature: float = 0.0
    ) -> list[str]:
        """Many files through ``/transcribe`` (up to 64 per call), transcribed in the server's batches."""
        texts: list[str] = []
        for start in range(0, len(audios), MAX_CLIPS_PER_CALL):
            encoded = [
                base64.b64encode(_read(a)[0]).decode() for a in audios[start : start + MAX_CLIPS_PER_CALL]
            ]
            body = {"audios": encoded, "prompt": prompt, "temperature": temperature}
            results = self._checked(self._http.post("/transcribe", json=body)).json()["results"]
            texts += [result["text"] for result in results]
        return texts

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise ServeRequestError(response.status_code, message)
        return response


def _read(audio: str | Path | bytes) -> tuple[bytes, str]:
    """The file's bytes and a name for the upload (the client reads local files; the server never does)."""
    if isinstance(audio, bytes):
        return audio, "audio"
    path = Path(audio)
    return path.read_bytes(), path.name
