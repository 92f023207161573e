"""``salm serve MODEL``: ``serve run`` on ``serve/config.yaml`` with the model and overrides filled in;
and ``salm transcribe --url URL``: transcription through a running server instead of a local model.

``salm transcribe`` itself belongs to ``salm.transcribe``; the ``--url`` path is added here so that
all HTTP code stays in ``serve/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from serve.client import API_KEY_ENV
from serve.throughput_mode import haproxy_port_conflict, with_throughput_mode, without_throughput_mode


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve a saved model over HTTP with Ray Serve (OpenAI-style /v1/audio/transcriptions)",
        description="Runs `serve run` on the Ray Serve config file with args.model set to MODEL, e.g. "
        "`salm serve runs/quickstart/runs/tiny/final.nemo args.max_audio_s=300 Transcriber.user_config.max_batch_audio_s=320 "
        "--port 8001` (overrides right after MODEL, options before MODEL or after the overrides).",
    )
    parser.add_argument("model", help="a saved SALM (HF-layout directory or .nemo file)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the config file: section.key=value")
    parser.add_argument("--config", default=None, help="Ray Serve config file (default: serve/config.yaml)")
    parser.add_argument("--host", default=None, help="HTTP host (default: the config's, 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--python-proxy",
        action="store_true",
        help="start the local cluster with Serve's Python HTTP proxy instead of its throughput mode "
        "(HAProxy; serve/throughput_mode.py). A running cluster keeps the mode it was started with.",
    )
    parser.set_defaults(func=run_serve)

    transcribe = commands.choices.get("transcribe")
    if transcribe is not None:
        transcribe.add_argument(
            "--url",
            default=None,
            help=f"transcribe through a running `salm serve` at this URL (MODEL is then ignored: the "
            f"server serves one model; the bearer token comes from ${API_KEY_ENV})",
        )
        transcribe.set_defaults(func=_remote_or_local(transcribe.get_default("func")))


def resolved_config(args: argparse.Namespace) -> dict:
    from serve.config_file import DEFAULT_CONFIG, load_serve_config

    if not Path(args.model).exists():
        raise FileNotFoundError(
            f"model {args.model!r} does not exist; give a saved SALM directory or .nemo file"
        )
    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f"http_options.host={args.host}")
    if args.port is not None:
        overrides.append(f"http_options.port={args.port}")
    return load_serve_config(args.config or DEFAULT_CONFIG, model=args.model, overrides=overrides)


def run_serve(args: argparse.Namespace) -> None:
    import yaml

    text = yaml.safe_dump(resolved_config(args), sort_keys=False)
    if args.dry_run:
        print(text, end="")
        return
    environment = serve_run_environment(args)
    conflict = haproxy_port_conflict(environment) if starts_its_own_cluster() else None
    if conflict:
        print(f"error: {conflict}", file=sys.stderr)
        raise SystemExit(2)
    with tempfile.NamedTemporaryFile("w", prefix="salm-serve-", suffix=".yaml", delete=False) as file:
        file.write(text)
    print(f"resolved config: {file.name}\nserve run {file.name}", file=sys.stderr)
    completed = subprocess.run(
        [sys.executable, "-m", "ray.serve.scripts", "run", file.name],
        env=environment,
        check=False,
    )
    if completed.returncode not in (0, 130):
        raise SystemExit(completed.returncode)


def starts_its_own_cluster() -> bool:
    """Whether ``serve run`` will start a local cluster (no ``RAY_ADDRESS``, no ``ray start`` cluster),
    by Ray's own lookup (no public API); False when unsure, so that no check is made then."""
    try:
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment(None, None) is None
    except Exception:
        return False


def serve_run_environment(args: argparse.Namespace) -> dict[str, str]:
    """The environment of ``serve run``, whose local cluster's processes inherit it: Serve's
    throughput mode unless ``--python-proxy``. Says which, since a running cluster ignores it."""
    if args.python_proxy:
        print("HTTP: Serve's Python proxy (--python-proxy)", file=sys.stderr)
        return without_throughput_mode(os.environ)
    environment = with_throughput_mode(os.environ)
    mode = (
        "on"
        if environment["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        else "off (RAY_SERVE_ENABLE_HA_PROXY in your environment)"
    )
    print(
        f"HTTP: Serve's throughput mode (HAProxy) {mode} for a cluster this starts; a running cluster "
        "keeps the mode it was started with (serve/throughput_mode.py). Replica logs: the Ray "
        "dashboard's Serve page, or /tmp/ray/session_latest/logs/serve/.",
        file=sys.stderr,
    )
    return environment


def _remote_or_local(local_run):
    def run(args: argparse.Namespace) -> None:
        if args.url is None:
            local_run(args)
            return
        from serve.client import ServeRequestError, TranscriptionClient

        try:
            with TranscriptionClient(args.url) as client:
                texts = client.transcribe_many(args.audio)
        except ServeRequestError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from error
        for path, text in zip(args.audio, texts, strict=True):
            print(f"{path}\t{text}")

    return run
