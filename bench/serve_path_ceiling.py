"""How many transcription requests per second the HTTP path in front of the model can carry.

The real Serve path (proxy -> ``Ingress``: multipart parsing, decoding, splitting -> handle call
carrying the float waveform) is deployed in front of ``InstantTranscriber``, a deployment that
answers as soon as a job arrives, so the model's time is taken out. Baseline in the same run: the
load client against a Starlette app that answers at once (``bench/load_client_ceiling.py``), i.e.
the most this client can send on this machine. Run on the GPU box's CPUs it says whether the
model or the path in front of it limits ``bench/serve_load.py`` at high concurrency.

Each mode runs on its own local Ray: ``default`` (Ray Serve's default, its Python HTTP proxy) and
``throughput`` (Serve's high-throughput mode, salm-ray's default: ``serve/throughput_mode.py``)::

    python -m bench.serve_path_ceiling --concurrency 16 64 256 --ingress-replicas 1 4 \
        --out bench/results/serve_path_ceiling_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from ray import serve

from bench.load_client_ceiling import echo_server
from bench.serve_load import Clip, free_port, run_load
from serve.ingress import Ingress, IngressSettings
from serve.throughput_mode import THROUGHPUT_MODE_ENV, without_throughput_mode
from serve.transcriber import PieceResult, TranscriptionJob

SAMPLING_RATE = 16_000
APP_NAME = "serve_path_ceiling"


@serve.deployment(name="InstantTranscriber", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class InstantTranscriber:
    """Answers each job at once; the text is the number of samples each piece carried, so a caller
    can check that the decoded audio, not just the request, went through."""

    def info(self) -> dict:
        return {"sampling_rate": SAMPLING_RATE, "max_batch_audio_s": 600, "device": "none"}

    async def transcribe(self, job: TranscriptionJob) -> list[PieceResult]:
        return [PieceResult(text=str(len(piece)), token_ids=[]) for piece in job.pieces]


def wav_clip(seconds: float, seed: int = 0) -> Clip:
    """A 16 kHz 16-bit WAV of noise (the ingress decodes it like speech; its content is irrelevant)."""
    samples = (np.random.default_rng(seed).standard_normal(int(seconds * SAMPLING_RATE)) * 3000).astype(
        np.int16
    )
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLING_RATE, format="WAV", subtype="PCM_16")
    return Clip(buffer.getvalue(), seconds)


def deploy_instant_path(port: int, ingress_replicas: int) -> str:
    """(Re)deploy Ingress -> InstantTranscriber on loopback ``port``; returns the base URL."""
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = IngressSettings(
        model_name="instant", max_upload_bytes=25 * 2**20, max_audio_s=600.0, max_chunk_s=40.0
    )
    ingress = Ingress.options(
        num_replicas=ingress_replicas,
        max_ongoing_requests=512,
        max_queued_requests=1024,
        ray_actor_options={"num_cpus": 0},
    )
    serve.run(ingress.bind(InstantTranscriber.bind(), settings), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def measure(url: str, clip: Clip, concurrencies: list[int], min_requests: int) -> list[dict]:
    """One aiohttp load run per concurrency (after an uncounted warm-up of 2 x concurrency)."""
    runs = []
    for concurrency in concurrencies:
        asyncio.run(run_load(url, [clip], concurrency, 2 * concurrency, None))
        runs.append(asyncio.run(run_load(url, [clip], concurrency, max(min_requests, 8 * concurrency), None)))
    return runs


def measure_mode(mode: str, args: argparse.Namespace, clip: Clip) -> dict[int, list[dict]]:
    """Runs per ingress replica count on a fresh local Ray whose processes start with ``mode``'s
    environment (Serve reads it at process start, so each mode is a child process)."""
    env = without_throughput_mode(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"  # loopback only
    if mode == "throughput":
        env.update(THROUGHPUT_MODE_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.json"
        command = [sys.executable, "-m", "bench.serve_path_ceiling", "--child-out", str(out)]
        command += ["--concurrency", *map(str, args.concurrency), "--requests", str(args.requests)]
        command += ["--ingress-replicas", *map(str, args.ingress_replicas), "--num-cpus", str(args.num_cpus)]
        command += ["--clip-s", str(args.clip_s)]
        subprocess.run(command, env=env, check=True)
        return {int(n): runs for n, runs in json.loads(out.read_text()).items()}


def run_child(args: argparse.Namespace, clip: Clip) -> None:
    import ray

    ray.init(num_cpus=args.num_cpus, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    port = free_port()
    by_replicas = {}
    try:
        for replicas in args.ingress_replicas:
            by_replicas[replicas] = measure(
                deploy_instant_path(port, replicas), clip, args.concurrency, args.requests
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    args.child_out.write_text(json.dumps(by_replicas))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--ingress-replicas", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["default", "throughput"],
        choices=["default", "throughput"],
        help="Ray Serve's default Python HTTP proxy, and its high-throughput mode (HAProxy; serve/throughput_mode.py)",
    )
    parser.add_argument("--requests", type=int, default=256, help="at least this many per run")
    parser.add_argument(
        "--clip-s", type=float, default=8.7, help="the flite clips' mean length in serve_load"
    )
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="logical CPUs of the local Ray")
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    clip = wav_clip(args.clip_s)
    if args.child_out:
        run_child(args, clip)
        return

    with echo_server() as url:
        client_ceiling = measure(url, clip, args.concurrency, args.requests)
    by_mode = {mode: measure_mode(mode, args, clip) for mode in args.modes}

    columns = [(mode, n) for mode in args.modes for n in args.ingress_replicas]
    print(
        f"{args.clip_s:g} s WAV uploads ({len(clip.data) // 1000} KB), {os.cpu_count()} cores; req/s (p99 s)"
    )
    print(
        f"{'clients':>8}{'client ceiling':>16}"
        + "".join(f"{f'{mode}, {n} ingress':>24}" for mode, n in columns)
    )
    for i, concurrency in enumerate(args.concurrency):
        line = f"{concurrency:>8}{client_ceiling[i]['requests_per_s']:>16.1f}"
        for mode, n in columns:
            run = by_mode[mode][n][i]
            cell = f"{run['requests_per_s']:.1f} ({run['p99_s']:.2f})"
            line += f"{cell:>24}"
        print(line, flush=True)
    result = {
        "machine": f"{os.cpu_count()} cores",
        "clip_s": args.clip_s,
        "upload_bytes": len(clip.data),
        "client_ceiling": client_ceiling,
        "serve_path": {
            mode: {str(n): runs for n, runs in by_replicas.items()} for mode, by_replicas in by_mode.items()
        },
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
