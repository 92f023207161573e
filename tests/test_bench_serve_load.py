"""bench/serve_load.py's client counts what the server answered: latencies and audio of successes only,
overall and per clip."""

import asyncio
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.serve_load import (
    Clip,
    build_random_model,
    free_port,
    run_load,
    set_up_like_the_transcriber,
    transcriber_user_config,
)

REPO = Path(__file__).resolve().parent.parent


def test_load_client_counts_statuses_errors_and_successful_audio() -> None:
    answers = itertools.cycle([200, 503])
    uploads: list[int] = []

    async def transcribe(request):
        form = await request.form()
        uploads.append(len(await form["file"].read()))
        return JSONResponse({"text": "x"}, status_code=next(answers))

    app = Starlette(routes=[Route("/v1/audio/transcriptions", transcribe, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        clips = [Clip(b"a" * 1000, 2.0), Clip(b"b" * 3000, 6.0)]
        result = asyncio.run(run_load(f"http://127.0.0.1:{port}", clips, 1, 6, None))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert uploads == [1000, 3000] * 3  # every request carried its clip's bytes, in order (1 client)
    assert result["statuses"] == {"200": 3, "503": 3}
    assert result["errors"] == 3
    assert result["audio_s"] == 3 * 2.0  # only the answered (200) uploads count: the 2 s clip each time
    assert result["p99_s"] > 0
    # per clip, shortest first: the 2 s clip answered 3 times, the 6 s clip never (all 503)
    assert [(row["clip_s"], row["answered"]) for row in result["by_clip"]] == [(2.0, 3), (6.0, 0)]
    assert 0 < result["by_clip"][0]["p50_s"] <= result["by_clip"][0]["max_s"]
    assert result["by_clip"][1]["p50_s"] is None


def test_serve_path_ceiling_sends_decoded_audio_through_the_real_ingress(ray_local) -> None:
    """``bench/serve_path_ceiling.py`` measures the real proxy + Ingress: uploads are decoded and
    their samples reach the instant transcriber, bad uploads get the Ingress's 400."""
    import httpx
    from ray import serve

    from bench.serve_path_ceiling import deploy_instant_path, measure, wav_clip

    clip = wav_clip(2.0)
    wait_until_serve_is_gone()  # a Serve instance shut down by an earlier test may still be dying
    try:
        url = deploy_instant_path(free_port(), ingress_replicas=1)
        runs = measure(url, clip, concurrencies=[2], min_requests=8)
        good = httpx.post(
            f"{url}/v1/audio/transcriptions", files={"file": ("a.wav", clip.data)}, data={"model": "x"}
        )
        bad = httpx.post(
            f"{url}/v1/audio/transcriptions", files={"file": ("a.wav", b"not audio")}, data={"model": "x"}
        )
    finally:
        serve.shutdown()
        wait_until_serve_is_gone()  # the next test deploys its own Serve instance
    assert good.status_code == 200
    assert good.json()["text"] == str(2 * 16_000)  # the decoded samples, counted by the transcriber
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_audio"
    assert runs[0]["requests"] == 16 and runs[0]["errors"] == 0
    assert runs[0]["audio_s"] == 32.0


def wait_until_serve_is_gone(timeout_s: float = 60.0) -> None:
    """Until the Serve controller actor no longer exists: a new Serve instance started while the old
    controller is still being killed attaches to it and fails with ActorDiedError."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the Serve controller still exists {timeout_s:g} s after serve.shutdown()")


def test_random_model_for_the_load_test_carries_its_model_overrides(tmp_path) -> None:
    """``--model-set`` reaches the saved model's config, which the server builds its model from."""
    from salm.model import SALM

    plain = SALM.from_pretrained(build_random_model(tmp_path / "plain", "tiny"))
    changed = SALM.from_pretrained(
        build_random_model(tmp_path / "changed", "tiny", ["perception.pad_attention_keys_to=8"])
    )
    assert plain.cfg.perception.get("pad_attention_keys_to") != 8
    assert changed.cfg.perception.pad_attention_keys_to == 8


def test_offline_times_the_model_set_up_as_the_servers_replica(tiny_model_cfg, capsys) -> None:
    """``--offline`` must time what the server ran: the replica's encoder layout (from the same
    ``user_config`` and ``--set`` overrides), and on a GPU its compiled encoder and decoding step."""
    from salm.model import SALM
    from salm.model.compile import encoder_layers, is_compiled
    from salm.model.rel_shift import StridedRelPositionAttention

    tiny_model_cfg.perception.pad_attention_keys_to = 8
    model = SALM(tiny_model_cfg).eval()

    def key_multiples() -> set[int]:
        return {m.key_multiple for m in model.modules() if isinstance(m, StridedRelPositionAttention)}

    set_up_like_the_transcriber(model, transcriber_user_config())
    assert key_multiples() == {0}  # serve/config.yaml: keep_encoder_layout false
    assert not any(is_compiled(layer) for layer in encoder_layers(model))  # a CPU replica runs eagerly
    assert model.compile_decoding is False
    set_up_like_the_transcriber(
        model, transcriber_user_config(["Transcriber.user_config.keep_encoder_layout=true"])
    )
    assert key_multiples() == {8}

    def on_a_gpu(overrides: list[str], fails: bool = False) -> SimpleNamespace:
        layers = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
        calls = []

        def call(name: str, rows: int) -> None:
            calls.append((name, rows))
            if fails:
                raise RuntimeError("Failed to find C compiler")

        stand_in = SimpleNamespace(
            device=torch.device("cuda"),
            cfg=model.cfg,
            sampling_rate=16000,
            default_prompt=model.default_prompt,
            compile_decoding=False,
            compile_prefill=False,
            calls=calls,
            prepare_generation_inputs=lambda prompts: call("encoder warm-up", len(prompts)),
            transcribe=lambda audios, max_new_tokens: call(
                "prefill compile" if stand_in.compile_prefill else "decoding compile", len(audios)
            ),
            perception=SimpleNamespace(
                set_encoder_layout=lambda **_: None, encoder=SimpleNamespace(layers=layers)
            ),
        )
        return set_up_like_the_transcriber(stand_in, transcriber_user_config(overrides))

    served = on_a_gpu([])  # serve/config.yaml compiles all three, with the replica's warm-up calls
    assert served.compile_decoding is True and served.compile_prefill is True
    assert all(is_compiled(layer) for layer in encoder_layers(served))
    assert served.calls == [
        ("encoder warm-up", 1),
        ("encoder warm-up", 2),
        ("decoding compile", 1),
        ("prefill compile", 1),
    ]
    eager = on_a_gpu(
        [f"Transcriber.user_config.compile_{part}=false" for part in ("encoder", "decoding", "prefill")]
    )
    assert eager.compile_decoding is False and eager.compile_prefill is False
    assert not any(is_compiled(layer) for layer in encoder_layers(eager))
    assert eager.calls == []
    failed = on_a_gpu([], fails=True)  # as the replica: eager again, and said
    assert failed.compile_decoding is False and failed.compile_prefill is False
    assert not any(is_compiled(layer) for layer in encoder_layers(failed))
    assert capsys.readouterr().out.count("compiling failed (RuntimeError: Failed to find C compiler)") == 3


def test_model_overrides_without_a_model_to_build_are_refused(monkeypatch, capsys) -> None:
    """``--model-set`` changes the random model it builds; with a saved model or a URL it would do nothing."""
    from bench import serve_load

    monkeypatch.setattr("sys.argv", ["serve_load", "--url", "http://127.0.0.1:1", "--model-set", "a=1"])
    with pytest.raises(SystemExit) as exit_info:
        serve_load.main()
    assert exit_info.value.code == 2
    assert "--model-set builds a model" in capsys.readouterr().err


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_naming(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return found


def test_a_local_run_stopped_by_sigterm_shuts_its_serve_and_haproxy_down(tmp_path, speech_clips) -> None:
    """``timeout`` and schedulers stop a bench with SIGTERM. The driver used to die without shutting
    Serve down: its HAProxy outlived it on HAProxy's fixed ports, and the next run's HAProxy crashed
    at startup (seen on the GPU machine). HAProxy's ports and files are moved to this test's own,
    so that no other Serve on the host collides with it."""
    stats_port, metrics_port = free_port(), free_port()
    # short: HAProxy refuses a socket path over 97 characters, and Ray adds a 56-character folder
    haproxy_dir = Path(tempfile.mkdtemp(prefix="hap", dir="/tmp"))
    env = {
        **os.environ,
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
    }
    command = [
        sys.executable, "-m", "bench.serve_load", "--tiny", "--audio", str(speech_clips[0].path),
        "--concurrency", "2", "--requests", "1000000", "--num-cpus", "2", "--out", str(tmp_path / "run.json"),
    ]  # fmt: skip
    log = tmp_path / "serve_load.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "local server up at" not in log.read_text():  # deployed: replicas up, HAProxy routing
            assert process.poll() is None, f"serve_load ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server never came up:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        assert _listening(stats_port), "HAProxy does not listen on this test's stats port"
        assert _processes_naming(str(haproxy_dir)), "the listening HAProxy is not this run's"
        time.sleep(3)  # into the load run
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    # Serve's logs come back beside --out even from a stopped run (a lent GPU machine keeps none)
    logs = tmp_path / "run_serve_logs"
    assert list(logs.glob("replica_*Transcriber*.log")), log.read_text()[-3000:]
    assert "Transcriber" in "".join(path.read_text() for path in logs.glob("controller_*.log"))
    assert not _listening(stats_port) and not _listening(metrics_port)
    try:
        assert not _processes_naming(str(haproxy_dir)), "HAProxy outlived the run"
    finally:
        shutil.rmtree(haproxy_dir, ignore_errors=True)
