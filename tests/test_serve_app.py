"""The Serve application on a real local Ray cluster, over real HTTP on loopback, with the tiny model.

One application is deployed for the whole module, the way `serve deploy serve/config.yaml` does it
(the config file, with overrides, PUT to the dashboard's Serve REST API), and torn down at the end.
"""

import asyncio
import base64
import io
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import free_port

from serve.config_file import load_serve_config
from serve.deploy import deploy_and_wait

API_KEY = "test-secret-key"
MAX_NEW_TOKENS = 8
MAX_CHUNK_S = 4
MAX_AUDIO_S = 30
MAX_ONGOING = 16
MAX_QUEUED = 16  # >= a 16-request burst: requests waiting to be assigned count as queued
START_TIMEOUT_S = 240


@dataclass
class Server:
    url: str
    model_dir: Path
    metrics_url: str
    first_replica: str

    def client(self, api_key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def server(ray_local, tiny_salm, tmp_path_factory):
    import ray
    from ray import serve

    model_dir = tiny_salm.save_pretrained(tmp_path_factory.mktemp("served") / "tiny")
    port = free_port()
    config = load_serve_config(
        model=model_dir,
        overrides=[
            "http_options.host=127.0.0.1",
            f"http_options.port={port}",
            f"args.max_chunk_s={MAX_CHUNK_S}",
            f"args.max_audio_s={MAX_AUDIO_S}",
            "args.max_upload_mb=1",
            "Ingress.autoscaling_config.max_replicas=1",
            f"Ingress.ray_actor_options={{num_cpus: 1, runtime_env: {{env_vars: {{SALM_SERVE_API_KEY: {API_KEY}}}}}}}",
            "Transcriber.autoscaling_config.max_replicas=1",
            f"Transcriber.max_ongoing_requests={MAX_ONGOING}",
            f"Transcriber.max_queued_requests={MAX_QUEUED}",
            f"Transcriber.user_config.max_new_tokens={MAX_NEW_TOKENS}",
            "Transcriber.user_config.batch_wait_timeout_s=0.2",
            "Transcriber.user_config.max_batch_audio_s=120",
            # On a GPU the replica compiles the decoding step at start; on CPU (eager decoding) the
            # option must still reach the model and not keep the replica from serving.
            "Transcriber.user_config.compile_decoding=true",
        ],
    )
    deploy_and_wait(config, ray_local.dashboard_url, timeout_s=START_TIMEOUT_S)
    node = next(n for n in ray.nodes() if n["Alive"])
    transcriber = serve.get_deployment_handle("Transcriber", app_name="salm")
    yield Server(
        url=f"http://127.0.0.1:{port}",
        model_dir=model_dir,
        metrics_url=f"http://127.0.0.1:{node['MetricsExportPort']}/metrics",
        first_replica=transcriber.info.remote().result()["replica"],
    )
    serve.shutdown()


def transcriber_call(method: str):
    from ray import serve

    return getattr(serve.get_deployment_handle("Transcriber", app_name="salm"), method).remote().result()


def wav_bytes(samples: np.ndarray, rate: int = 16000, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def upload(client: httpx.Client, data: bytes, **fields) -> httpx.Response:
    return client.post(
        "/v1/audio/transcriptions", files={"file": ("clip.wav", data)}, data={"model": "x", **fields}
    )


async def upload_concurrently(server: Server, data: bytes, count: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120, limits=limits) as client:
        requests = [
            client.post("/v1/audio/transcriptions", files={"file": ("c.wav", data)}, data={"model": "x"})
            for _ in range(count)
        ]
        return await asyncio.gather(*requests)


def test_probes_and_model_list(server: Server) -> None:
    with server.client(api_key=None) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
    with server.client() as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]


def test_http_goes_through_haproxy_in_serves_throughput_mode(server: Server) -> None:
    """The session's cluster starts as ``salm serve`` starts one: HAProxy in front of the ingress."""
    from ray.util.state import list_actors

    managers = list_actors(filters=[("class_name", "=", "HAProxyManager"), ("state", "=", "ALIVE")])
    assert managers, "no HAProxyManager: Serve runs its Python proxy (see serve/throughput_mode.py)"
    with server.client() as client:
        assert client.get("/healthz").status_code == 200


def test_single_upload_matches_offline_transcription(server: Server, tiny_salm, speech_clips) -> None:
    clip = speech_clips[2]  # flite `kal`: 8 kHz, so the ingress resamples it
    expected = tiny_salm.transcribe([clip.path], max_new_tokens=MAX_NEW_TOKENS)[0]
    with server.client() as client:
        response = upload(client, clip.path.read_bytes())
    assert response.status_code == 200, response.text
    assert response.json()["text"] == expected


def test_openai_client_gets_transcripts_in_each_format(server: Server, tiny_salm, speech_clips) -> None:
    import openai

    clip = speech_clips[0]
    expected = tiny_salm.transcribe([clip.path], max_new_tokens=MAX_NEW_TOKENS)[0]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with clip.path.open("rb") as file:
        assert client.audio.transcriptions.create(model="tiny", file=file).text == expected
    with clip.path.open("rb") as file:
        text = client.audio.transcriptions.create(model="tiny", file=file, response_format="text")
    assert text.strip() == expected
    with clip.path.open("rb") as file:
        verbose = client.audio.transcriptions.create(
            model="tiny", file=file, response_format="verbose_json", language="en", temperature=0.0
        )
    assert verbose.text == expected and len(verbose.segments) == 1
    assert verbose.duration == pytest.approx(sf.info(clip.path).duration, abs=0.01)


def test_json_route_transcribes_several_clips_in_one_call(server: Server, tiny_salm, speech_clips) -> None:
    clips = [speech_clips[1].path, speech_clips[3].path]
    expected = [tiny_salm.transcribe([path], max_new_tokens=MAX_NEW_TOKENS)[0] for path in clips]
    body = {"audios": [base64.b64encode(path.read_bytes()).decode() for path in clips]}
    with server.client() as client:
        response = client.post("/transcribe", json=body)
    assert response.status_code == 200, response.text
    assert [result["text"] for result in response.json()["results"]] == expected


def test_sixteen_concurrent_requests_are_served_in_batches(server: Server, speech_clips) -> None:
    before = transcriber_call("stats")
    started = time.monotonic()
    responses = asyncio.run(upload_concurrently(server, speech_clips[0].path.read_bytes(), 16))
    elapsed_s = time.monotonic() - started
    stats = transcriber_call("stats")
    batches = stats["batch_requests"][len(before["batch_requests"]) :]
    assert [r.status_code for r in responses] == [200] * 16
    assert len({r.json()["text"] for r in responses}) == 1  # batching does not change the transcript
    assert sum(batches) == 16
    assert max(batches) > 1, f"requests per batch: {batches}"
    waits = stats["model_wait_s"][len(before["model_wait_s"]) :]  # one per request, not per batch
    assert len(waits) == 16
    assert all(0 <= wait < elapsed_s for wait in waits)


def test_user_config_reaches_the_model(server: Server) -> None:
    stats = transcriber_call("stats")
    assert stats["compile_decoding"] is True  # set by the fixture's overrides
    # serve/config.yaml turns compile_prefill on; a CPU replica must not compile the LLM for minutes
    assert stats["compile_prefill"] is False


def test_long_audio_is_split_at_quiet_points_and_joined(server: Server, speech_clips) -> None:
    rate = 16000
    gap = np.zeros(int(0.5 * rate), np.float32)
    parts = [sf.read(c.path, dtype="float32")[0] for c in speech_clips if sf.info(c.path).samplerate == rate][
        :4
    ]
    samples = np.concatenate([x for part in parts for x in (part, gap)])
    assert len(samples) / rate > 2 * MAX_CHUNK_S
    with server.client() as client:
        response = upload(client, wav_bytes(samples), response_format="verbose_json")
    assert response.status_code == 200, response.text
    body = response.json()
    segments = body["segments"]
    assert len(segments) >= 3
    assert segments[0]["start"] == 0 and segments[-1]["end"] == pytest.approx(len(samples) / rate)
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:], strict=False))
    assert all(s["end"] - s["start"] <= MAX_CHUNK_S for s in segments)
    assert body["text"] == " ".join(s["text"] for s in segments if s["text"])


def zero_length_wav() -> bytes:
    return wav_bytes(np.zeros(0, np.float32))


BAD_UPLOADS = {
    "empty": (b"", 400),
    "not_audio": (b"hello, this is a text file\n" * 50, 400),
    "corrupt": (np.random.default_rng(0).bytes(5000), 400),
    "truncated_header": (b"RIFF\x24\x08\x00\x00WAVEfmt ", 400),
    "zero_length": (zero_length_wav(), 400),
    "nan_samples": (wav_bytes(np.full(16000, np.nan, np.float32), subtype="FLOAT"), 400),
    "over_size_limit": (wav_bytes(np.zeros(16000 * 40, np.float32), subtype="FLOAT"), 413),  # 2.4 MiB > 1 MiB
    "over_duration_limit": (wav_bytes(np.zeros(8000 * (MAX_AUDIO_S + 5), np.int16), rate=8000), 413),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_gets_its_status_and_a_message(server: Server, case: str) -> None:
    data, status = BAD_UPLOADS[case]
    with server.client() as client:
        response = upload(client, data)
    assert response.status_code == status, response.text
    assert len(response.json()["error"]["message"]) > 10


def test_missing_fields_get_422(server: Server, speech_clips) -> None:
    with server.client() as client:
        no_file = client.post("/v1/audio/transcriptions", data={"model": "x"})
        no_model = client.post(
            "/v1/audio/transcriptions", files={"file": ("a.wav", speech_clips[0].path.read_bytes())}
        )
        no_audios = client.post("/transcribe", json={})
    assert (no_file.status_code, no_model.status_code, no_audios.status_code) == (422, 422, 422)
    assert "file" in no_file.json()["error"]["message"]


def test_server_side_paths_are_never_opened(server: Server, speech_clips) -> None:
    path = str(speech_clips[0].path)  # a real audio file on the server's disk
    with server.client() as client:
        as_form_field = client.post("/v1/audio/transcriptions", data={"model": "x", "file": path})
        as_json_field = client.post("/transcribe", json={"audios": [], "path": path})
        as_base64_text = client.post(
            "/transcribe", json={"audios": [base64.b64encode(path.encode()).decode()]}
        )
        not_base64 = client.post("/transcribe", json={"audios": [path]})
    assert as_form_field.status_code == 422
    assert as_json_field.status_code == 422
    assert (
        as_base64_text.status_code == 400 and "decoded as audio" in as_base64_text.json()["error"]["message"]
    )
    assert not_base64.status_code == 400 and "base64" in not_base64.json()["error"]["message"]


def test_prompt_with_two_audio_placeholders_gets_400(server: Server, speech_clips) -> None:
    prompt = "Compare <|audioplaceholder|> and <|audioplaceholder|>"
    with server.client() as client:
        response = upload(client, speech_clips[0].path.read_bytes(), prompt=prompt)
    assert response.status_code == 400 and "placeholder" in response.json()["error"]["message"]


def test_client_and_salm_transcribe_url(server: Server, tiny_salm, speech_clips, monkeypatch, capsys) -> None:
    from salm.cli import main
    from serve.client import ServeRequestError, TranscriptionClient

    paths = [speech_clips[4].path, speech_clips[5].path]
    expected = [tiny_salm.transcribe([path], max_new_tokens=MAX_NEW_TOKENS)[0] for path in paths]
    with TranscriptionClient(server.url, api_key=API_KEY) as client:
        assert client.ready() and client.models() == ["tiny"]
        assert client.transcribe(paths[0]) == expected[0]
    with (
        TranscriptionClient(server.url, api_key="wrong") as client,
        pytest.raises(ServeRequestError, match="401"),
    ):
        client.transcribe(paths[0])

    monkeypatch.setenv("SALM_SERVE_API_KEY", API_KEY)
    assert main(["transcribe", "tiny", *map(str, paths), "--url", server.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{path}\t{text}" for path, text in zip(paths, expected, strict=True)]


def test_api_key_is_required_except_for_probes(server: Server) -> None:
    with server.client(api_key=None) as anonymous, server.client(api_key="wrong") as wrong:
        assert anonymous.get("/v1/models").status_code == 401
        assert wrong.get("/v1/models").status_code == 401
        assert anonymous.get("/healthz").status_code == 200


def test_overload_beyond_the_queue_gets_503_with_retry_after(server: Server, speech_clips) -> None:
    count = 4 * (MAX_ONGOING + MAX_QUEUED)
    responses = asyncio.run(upload_concurrently(server, speech_clips[2].path.read_bytes(), count))
    statuses = [r.status_code for r in responses]
    shed = [r for r in responses if r.status_code == 503]
    assert shed, f"no request was shed: {statuses}"
    assert all(r.headers.get("retry-after", "").isdigit() for r in shed)
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= MAX_ONGOING


def test_bad_requests_did_not_take_the_replica_down(server: Server, speech_clips) -> None:
    with server.client() as client:
        assert upload(client, speech_clips[0].path.read_bytes()).status_code == 200
    assert transcriber_call("info")["replica"] == server.first_replica


def test_metrics_reach_prometheus(server: Server) -> None:
    wanted = {
        "latency histogram": r"^ray_salm_serve_request_latency_s_bucket\{",
        "batch size": r"^ray_salm_serve_batch_requests_bucket\{",
        "audio seconds": r"^ray_salm_serve_audio_seconds_total\{",
        "rtfx": r"^ray_salm_serve_rtfx\{",
        "queue depth": r"^ray_salm_serve_queue_depth\{",
        "model wait": r"^ray_salm_serve_model_wait_s_bucket\{",
        "rejected bad audio": r'^ray_salm_serve_requests_rejected_total\{[^}]*reason="bad_audio"',
        "rejected overload": r'^ray_salm_serve_requests_rejected_total\{[^}]*reason="overloaded"',
    }
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            text = response.read().decode()
        missing = [name for name, pattern in wanted.items() if not re.search(pattern, text, re.MULTILINE)]
        if not missing:
            break
        time.sleep(2)
    assert not missing, f"not exported: {missing}"
    # Some batch held more than one request: fewer batches fall in the le="1" bucket than in total.
    # Summed over every series (each replica process exports its own).
    single = re.findall(
        r'^ray_salm_serve_batch_requests_bucket\{[^}]*le="1\.0"[^}]*\} ([\d.]+)$', text, re.MULTILINE
    )
    total = re.findall(r"^ray_salm_serve_batch_requests_count\{.* ([\d.]+)$", text, re.MULTILINE)
    assert single and total
    assert sum(map(float, total)) > sum(map(float, single))


def test_a_cpu_replica_on_a_gpu_cluster_says_how_to_get_its_gpu_back() -> None:
    from serve.transcriber import missing_gpu_warning

    warning = missing_gpu_warning("cpu", cluster_gpus=2.0)
    assert warning is not None and "add `num_gpus: 1`" in warning and "has 2" in warning
    assert missing_gpu_warning("cuda", cluster_gpus=2.0) is None  # got its GPU
    assert missing_gpu_warning("cpu", cluster_gpus=0.0) is None  # a CPU-only cluster is fine
