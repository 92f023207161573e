"""Load generator for a salm-ray server: audio-s/s, latency percentiles and errors at a concurrency.

Each of ``--concurrency`` workers posts clips to ``/v1/audio/transcriptions`` back to back until
the run's requests have been sent; throughput counts the audio of successful requests over the
wall time of the whole run. A run measures the steady state at its concurrency: it is preceded by
``--warmup-rounds`` x concurrency requests that are not counted (the server captures the decoders
for that load's batch sizes and its queues fill), and sends at least ``--rounds`` requests per
client (``--requests`` is the minimum in all), so that p99 is not the cold start of a handful of
batches. Run it against a server that is up::

    python bench/serve_load.py --url http://127.0.0.1:8000 --concurrency 16 --requests 256

or let it start one (local Ray in Serve's throughput mode as ``salm serve`` starts it, or
``--python-proxy``; ``serve/config.yaml`` deployed through the dashboard like ``serve deploy``,
loopback only) for a saved model, or for the tiny model built on the spot::

    python bench/serve_load.py --tiny --concurrency 16 --requests 128 --offline \
        --out bench/results/serve_load_cpu.json

``--offline`` also times ``SALM.generate`` on the same clips in batches of ``--concurrency``, in
the same process after the server is gone, on the model set up as the server's replica was (its
``user_config``: encoder layout, compiled encoder and decoding step on a GPU), so the served number
reads against what the same model does offline on the same machine. Clips are synthesised offline
with flite unless ``--audio`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import aiohttp
import numpy as np
import soundfile as sf

from serve.throughput_mode import THROUGHPUT_MODE_ENV, with_throughput_mode

RESULTS = Path(__file__).resolve().parent / "results"
VOICES = ["kal16", "slt", "rms", "awb"]


@dataclass(frozen=True)
class Clip:
    data: bytes
    seconds: float


def load_clips(paths: list[Path]) -> list[Clip]:
    return [Clip(path.read_bytes(), sf.info(path).duration) for path in paths]


async def run_load(url: str, clips: list[Clip], concurrency: int, requests: int, api_key: str | None) -> dict:
    """Send ``requests`` uploads with ``concurrency`` in flight; latency and audio of the successful ones.

    The client is aiohttp: httpx's ``AsyncClient`` posted 280 KB uploads at only 84-110 requests/s
    with 64-256 in flight (591 at 16), against a server that answers at once on the 2-core box, so
    at high concurrency it measured itself; aiohttp sent 1,300-1,350/s there
    (``bench/load_client_ceiling.py``, BENCHMARKS.md).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    latencies_by_clip: list[list[float]] = [[] for _ in clips]
    statuses: Counter = Counter()
    audio_s = 0.0
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal audio_s
            while (index := next(counter)) < requests:
                clip_index = index % len(clips)
                clip = clips[clip_index]
                form = aiohttp.FormData()
                form.add_field("file", clip.data, filename="clip.wav")
                form.add_field("model", "x")
                started = time.perf_counter()
                try:
                    async with session.post("/v1/audio/transcriptions", data=form) as response:
                        await response.read()
                        status = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as error:
                    status = type(error).__name__
                statuses[status] += 1
                if status == "200":
                    latencies.append(time.perf_counter() - started)
                    latencies_by_clip[clip_index].append(latencies[-1])
                    audio_s += clip.seconds

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) if latencies else (float("nan"),) * 3
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": requests - statuses["200"],
        "statuses": dict(statuses),
        "wall_s": round(wall_s, 3),
        "audio_s": round(audio_s, 3),
        "audio_s_per_s": round(audio_s / wall_s, 3),
        "requests_per_s": round(statuses["200"] / wall_s, 3),
        "p50_s": round(float(p50), 3),
        "p90_s": round(float(p90), 3),
        "p99_s": round(float(p99), 3),
        "by_clip": latency_by_clip(clips, latencies_by_clip),
    }


def latency_by_clip(clips: list[Clip], latencies_by_clip: list[list[float]]) -> list[dict]:
    """Answered requests, median and slowest latency of each clip, shortest clip first: whether slow
    requests come with some clip lengths (a shape the model handles badly) or with any clip."""
    rows = []
    for clip, latencies in sorted(
        zip(clips, latencies_by_clip, strict=True), key=lambda pair: pair[0].seconds
    ):
        rows.append(
            {
                "clip_s": round(clip.seconds, 3),
                "answered": len(latencies),
                "p50_s": round(float(np.median(latencies)), 3) if latencies else None,
                "max_s": round(max(latencies), 3) if latencies else None,
            }
        )
    return rows


def synthesise_clips(workdir: Path, count: int, sentences_per_clip: int) -> list[Path]:
    """``count`` flite clips of ``sentences_per_clip`` sentences each (3: ~10 s), four voices."""
    from salm.assets.synthetic_speech import make_sentences, synthesize_corpus

    sentences = make_sentences(count * sentences_per_clip, seed=11)
    texts = [
        ", and ".join(sentences[i : i + sentences_per_clip])
        for i in range(0, len(sentences), sentences_per_clip)
    ]
    return [u.path for u in synthesize_corpus(workdir / "speech", texts, VOICES)]


def load_like_a_replica(model_dir: Path):
    """The saved model as a replica loads it: bf16 on a GPU (fp32 on CPU), the mel front end fp32,
    eval, LoRA merged (``salm.generate.on_device_for_inference``). It keeps the encoder layout it was
    saved with (a replica switches to inference's unless ``keep_encoder_layout``)."""
    import torch

    from salm.generate import on_device_for_inference
    from salm.io.nemo_file import merge_lora_into_llm
    from salm.model import SALM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return merge_lora_into_llm(on_device_for_inference(SALM.from_pretrained(model_dir), device))


def transcriber_user_config(overrides: Sequence[str] = ()) -> dict:
    """The Transcriber's ``user_config`` in ``serve/config.yaml`` with the server's ``--set`` overrides."""
    from serve.config_file import load_serve_config

    config = load_serve_config(overrides=list(overrides))
    (transcriber,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Transcriber"]
    return transcriber.get("user_config") or {}


def set_up_like_the_transcriber(model, user_config: dict):
    """``model`` (as ``load_like_a_replica`` returns it) set up as a Transcriber replica with this
    ``user_config`` sets it up before serving: the encoder layout, and on a GPU the compiled encoder
    layers (warmed up as the replica does), decoding step and prefill, through the replica's own
    functions (``salm.inference_compile``), falling back to eager as it does. So ``--offline`` times the model
    the server ran, not another setup."""
    from salm.inference_compile import compile_decoding_now, compile_encoder_now, compile_prefill_now
    from serve.transcriber import BatchingConfig, serve_encoder_layout

    config = BatchingConfig(**user_config)
    serve_encoder_layout(model, config.keep_encoder_layout)
    if model.device.type != "cuda":  # as the replica: CPUs run everything eagerly
        return model
    model.compile_decoding = model.compile_prefill = False
    failures = {}
    if config.compile_encoder:
        failures["compile_encoder"] = compile_encoder_now(model, model.default_prompt)
    if config.compile_decoding:
        failures["compile_decoding"] = compile_decoding_now(model, config.max_new_tokens)
    if config.compile_prefill:
        failures["compile_prefill"] = compile_prefill_now(model, config.max_new_tokens)
    for option, failure in failures.items():
        if failure is not None:
            print(f"{option}: compiling failed ({failure}); timing that part eagerly, as the replica would")
    return model


def offline_throughput(
    model_dir: Path,
    paths: list[Path],
    batch_sizes: list[int],
    requests: int,
    max_new_tokens: int,
    user_config: dict,
) -> list[dict]:
    """``SALM.generate`` on the same clips in batches of each size, the model set up as the server's
    replica (``user_config``): the no-serving ceiling."""
    from salm.audio import load_audio

    model = set_up_like_the_transcriber(load_like_a_replica(model_dir), user_config)
    waves = [load_audio(path, model.sampling_rate) for path in paths]
    order = [waves[i % len(waves)] for i in range(requests)]
    results = []
    for batch_size in batch_sizes:
        model.transcribe(order[:batch_size], max_new_tokens=max_new_tokens)  # warm-up
        started = time.perf_counter()
        for start in range(0, len(order), batch_size):
            model.transcribe(order[start : start + batch_size], max_new_tokens=max_new_tokens)
        wall_s = time.perf_counter() - started
        audio_s = sum(len(w) for w in order) / model.sampling_rate
        results.append(
            {
                "batch_size": batch_size,
                "requests": requests,
                "wall_s": round(wall_s, 3),
                "seconds_per_batch": round(wall_s / -(-len(order) // batch_size), 3),
                "audio_s_per_s": round(audio_s / wall_s, 3),
            }
        )
    return results


def build_random_model(workdir: Path, shape: str, model_overrides: Sequence[str] = ()) -> Path:
    """The tiny recipe or the canary-qwen-2.5b shapes with random weights (seed 0), saved in the HF
    layout; ``model_overrides`` are dotted ``key=value`` settings of its ``model`` config (e.g.
    ``perception.channels_last_subsampling=false``), to A/B a model option over HTTP."""
    import torch
    from omegaconf import OmegaConf

    from bench.common import recipe, write_llm_dir
    from salm.model import SALM

    tiny = shape == "tiny"
    cfg = recipe(write_llm_dir(workdir / f"{shape}_llm", tiny=tiny), tiny=tiny).model
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(model_overrides)))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 2.5B: seconds on a GPU
    torch.manual_seed(0)
    with torch.device(device):
        model = SALM(cfg)
    return model.save_pretrained(workdir / shape, dtype=torch.bfloat16 if device == "cuda" else None)


def transcriber_stats() -> dict:
    """The local server's per-batch record (requests, model seconds); one replica, as this script deploys."""
    from ray import serve

    return serve.get_deployment_handle("Transcriber", app_name="salm").stats.remote().result()


def batch_summary(stats: dict, before: dict, wall_s: float) -> dict:
    """Batches of one run: how many, requests per batch, the share of the run the model was busy, and
    how long requests waited in the replica for the model.

    A busy share well below 1 at high concurrency means the path in front of the model (proxy,
    ingress, handles) limits throughput, not the model.
    """
    requests = stats["batch_requests"][len(before["batch_requests"]) :]
    seconds = stats["batch_seconds"][len(before["batch_seconds"]) :]
    waits = stats["model_wait_s"][len(before["model_wait_s"]) :]
    return {
        "batches": len(requests),
        "mean_requests_per_batch": round(float(np.mean(requests)), 2) if requests else 0.0,
        "max_requests_per_batch": max(requests, default=0),
        "model_busy_s": round(sum(seconds), 3),
        "model_busy_fraction": round(sum(seconds) / wall_s, 3) if wall_s else 0.0,
        "mean_batch_s": round(float(np.mean(seconds)), 3) if seconds else 0.0,
        # per request, in the replica, before its batch started: the rest of the latency is the
        # batch itself and the HTTP path (proxy, ingress, handles)
        "model_wait_p50_s": round(float(np.percentile(waits, 50)), 3) if waits else 0.0,
        "model_wait_p99_s": round(float(np.percentile(waits, 99)), 3) if waits else 0.0,
        # new greedy decoders (on a GPU: a KV cache and a CUDA graph capture each) during the run
        "decoder_captures": stats["decoder_cache"]["misses"] - before["decoder_cache"]["misses"],
        "decoder_capture_s": round(
            stats["decoder_cache"]["capture_s"] - before["decoder_cache"]["capture_s"], 3
        ),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, a scheduler) becomes ``SystemExit``, so that ``stop_local_server`` runs.

    Otherwise the driver dies without its cleanup and the local Serve's HAProxy outlives it on its
    fixed ports (stats 8404, metrics 9101): the next run's HAProxy then crashes at startup."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def stop_local_server(logs_dest: Path | None = None) -> None:
    """Shut down what ``start_local_server`` started, HAProxy included; nothing if Ray never started.
    With ``logs_dest``, Serve's logs are copied there once Serve has stopped (``copy_serve_logs``)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        if logs_dest is not None:
            print(f"{copy_serve_logs(logs_dest)} Serve log files copied to {logs_dest}", flush=True)
        ray.shutdown()


def copy_serve_logs(dest: Path) -> int:
    """Copy the local cluster's Serve logs (controller, proxy, each replica's) into ``dest``; returns
    how many files. Why: the replica says there what the load cannot show (its decoding-step compile
    time or fall-back, the decoder warm-up, warnings), and on a lent GPU machine the cluster's
    session folder is lost with the machine, while ``--out`` comes back."""
    import shutil

    import ray

    if not ray.is_initialized():
        return 0
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"  # no public API
    files = sorted(logs.glob("*.log")) if logs.is_dir() else []
    dest.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(file, dest / file.name)
    return len(files)


def run_loads(url: str, clips: list[Clip], args: argparse.Namespace) -> list[dict]:
    """One measured run per ``--concurrency``, each after its unmeasured warm-up requests."""
    runs = []
    for concurrency in args.concurrency:
        warmup = asyncio.run(
            run_load(url, clips, concurrency, args.warmup_rounds * concurrency, args.api_key)
        )
        seen = transcriber_stats() if args.url is None else None
        requests = max(args.requests, args.rounds * concurrency)
        runs.append(asyncio.run(run_load(url, clips, concurrency, requests, args.api_key)))
        runs[-1]["warmup"] = {k: warmup[k] for k in ("requests", "errors", "wall_s", "p99_s")}
        if seen is not None:
            runs[-1].update(batch_summary(transcriber_stats(), seen, runs[-1]["wall_s"]))
        print(json.dumps(runs[-1]), flush=True)
    return runs


def start_local_server(
    model_dir: Path, overrides: list[str], num_cpus: int, python_proxy: bool = False
) -> str:
    """Local Ray (dashboard on loopback) with serve/config.yaml deployed; returns the HTTP base URL.

    Serve runs in its throughput mode, as ``salm serve`` starts it, or with its Python HTTP proxy."""
    import ray

    from serve.config_file import load_serve_config
    from serve.deploy import deploy_and_wait

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; Ray 2.60 enables token auth
    # the local cluster's processes inherit this environment
    if python_proxy:
        for name in THROUGHPUT_MODE_ENV:
            os.environ.pop(name, None)
    else:
        os.environ.update(with_throughput_mode(os.environ))
    context = ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    exit_on_sigterm()  # after ray.init, whose driver installs its own SIGTERM handler
    port = free_port()
    config = load_serve_config(
        model=model_dir,
        overrides=[
            "http_options.host=127.0.0.1",
            f"http_options.port={port}",
            "args.api_key_env=null",
            *overrides,
        ],
    )
    deploy_and_wait(config, context.dashboard_url)
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--model", type=Path, help="start a local server for this saved model")
    target.add_argument("--tiny", action="store_true", help="start a local server for the tiny model")
    target.add_argument(
        "--canary-shape", action="store_true", help="... for canary-qwen-2.5b shapes, random weights (GPU)"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[16], help="one load run per value, same server"
    )
    parser.add_argument("--requests", type=int, default=128, help="at least this many per concurrency")
    parser.add_argument(
        "--rounds", type=int, default=8, help="and at least this many per client (concurrency x rounds)"
    )
    parser.add_argument(
        "--warmup-rounds",
        type=int,
        default=2,
        help="before each run, concurrency x this many requests that are not counted",
    )
    parser.add_argument("--audio", type=Path, nargs="*", help="clips to send (default: 16 synthesised ones)")
    parser.add_argument(
        "--sentences-per-clip",
        type=int,
        default=1,
        help="synthesised clips join this many sentences (1: ~3 s; 3: ~10 s, the GPU targets' clip length)",
    )
    parser.add_argument("--api-key", default=os.environ.get("SALM_SERVE_API_KEY"))
    parser.add_argument("--max-new-tokens", type=int, default=32, help="local server and --offline only")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for the local server")
    parser.add_argument(
        "--model-set",
        nargs="*",
        default=[],
        help="--tiny/--canary-shape: overrides of the built model's config, e.g. perception.pad_attention_keys_to=null",
    )
    parser.add_argument(
        "--python-proxy",
        action="store_true",
        help="local server: Serve's Python HTTP proxy instead of its throughput mode (serve/throughput_mode.py)",
    )
    parser.add_argument("--offline", action="store_true", help="also time offline batched generation")
    parser.add_argument(
        "--offline-batch-sizes",
        type=int,
        nargs="*",
        help="--offline's batch sizes (default: the concurrencies)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the result JSON here (a local server's Serve logs go beside it, in NAME_serve_logs/)",
    )
    args = parser.parse_args()
    if args.model_set and not (args.tiny or args.canary_shape):
        parser.error("--model-set builds a model: use it with --tiny or --canary-shape")

    workdir = Path(tempfile.mkdtemp(prefix="serve_load_"))
    paths = args.audio or synthesise_clips(workdir, 16, args.sentences_per_clip)
    clips = load_clips(paths)
    if args.tiny or args.canary_shape:
        model_dir = build_random_model(
            workdir, "tiny" if args.tiny else "canary_qwen_2.5b_shape", args.model_set
        )
    else:
        model_dir = args.model
    url = args.url
    if url is None:
        longest_s = round(max(clip.seconds for clip in clips), 3)  # the same frames, so the same cache length
        overrides = [
            f"Transcriber.user_config.max_new_tokens={args.max_new_tokens}",
            # GPU: capture at start the decoders of batches that hold the longest clip (most batches
            # beyond a few requests do), not those of serve/config.yaml's clip lengths
            f"Transcriber.user_config.warm_up_clip_s=[{longest_s}]",
            "Transcriber.autoscaling_config.max_replicas=1",
            "Ingress.autoscaling_config.max_replicas=1",
            *args.set,
        ]
    try:
        if url is None:
            url = start_local_server(model_dir, overrides, args.num_cpus, args.python_proxy)
            print(f"local server up at {url}: the load starts", flush=True)
        runs = run_loads(url, clips, args)
    finally:  # also on SIGTERM or an error: a local Serve left behind breaks the next run's
        if args.url is None:
            stop_local_server(args.out.with_name(f"{args.out.stem}_serve_logs") if args.out else None)
    result = dict(runs[0])  # the first concurrency's numbers at the top level; all of them in "runs"
    result.update(
        url=url if args.url else "local",
        model=f"{model_dir.name} (random weights)"
        if args.tiny or args.canary_shape
        else str(model_dir or "remote"),
        clips=len(clips),
        mean_clip_s=round(sum(c.seconds for c in clips) / len(clips), 3),
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        date=date.today().isoformat(),
    )
    if args.url is None:
        result["max_new_tokens"] = args.max_new_tokens
        result["throughput_mode"] = not args.python_proxy
        result["model_set"] = args.model_set
    if args.offline:  # batches as large as the concurrency: what the server could batch at best
        if model_dir is None:
            parser.error("--offline needs --model or --tiny")
        extra = [size for size in args.offline_batch_sizes or [] if size not in args.concurrency]
        user_config = transcriber_user_config(overrides if args.url is None else ())
        offline = offline_throughput(
            model_dir, paths, args.concurrency + extra, args.requests, args.max_new_tokens, user_config
        )
        for run, ceiling in zip(runs, offline, strict=False):
            run["offline"] = ceiling
            run["served_vs_offline"] = round(run["audio_s_per_s"] / run["offline"]["audio_s_per_s"], 3)
        result["offline"], result["served_vs_offline"] = runs[0]["offline"], runs[0]["served_vs_offline"]
        if extra:  # e.g. the served runs' own batch sizes, to read their model seconds per batch against
            result["offline_by_batch"] = offline
    if len(runs) > 1:
        result["runs"] = runs
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
