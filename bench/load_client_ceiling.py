"""How many uploads per second the load generator itself can send: its ceiling, not the server's.

A Starlette app that reads the multipart upload and answers at once runs under uvicorn in a
subprocess on loopback; ``bench/serve_load.py``'s client (aiohttp) and the httpx ``AsyncClient`` it
used before (the baseline) each post 280 KB uploads at every concurrency, in the same run::

    python -m bench.load_client_ceiling --concurrency 1 16 64 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np

from bench.serve_load import Clip, free_port, run_load

UPLOAD = Clip(b"RIFF" + bytes(280_000), 8.7)  # the size of a 8.7 s 16 kHz WAV; its content is never decoded
ECHO_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def transcribe(request):
    form = await request.form()
    return JSONResponse({"text": str(len(await form["file"].read()))})

app = Starlette(routes=[Route("/v1/audio/transcriptions", transcribe, methods=["POST"])])
"""


async def httpx_load(url: str, concurrency: int, requests: int) -> dict:
    """The client ``serve_load`` had before aiohttp: one ``httpx.AsyncClient`` with a pool of ``concurrency``."""
    latencies: list[float] = []
    counter = itertools.count()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while next(counter) < requests:
                started = time.perf_counter()
                await client.post(
                    "/v1/audio/transcriptions", files={"file": ("clip.wav", UPLOAD.data)}, data={"model": "x"}
                )
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return {
        "requests_per_s": round(requests / wall_s, 1),
        "p99_s": round(float(np.percentile(latencies, 99)), 3),
    }


def wait_for_server(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the echo server did not come up at {url}")


@contextlib.contextmanager
def echo_server() -> Iterator[str]:
    """``ECHO_APP`` under uvicorn in a subprocess on loopback; yields its base URL."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ECHO_APP + f"\nimport uvicorn\nuvicorn.run(app, port={port}, log_level='warning')",
        ]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url)
        yield url
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    args = parser.parse_args()
    with echo_server() as url:
        print(f"{'clients':>8}{'aiohttp req/s':>15}{'p99':>8}{'httpx req/s':>13}{'p99':>8}{'ratio':>7}")
        for concurrency in args.concurrency:
            requests = max(256, 4 * concurrency)
            ours = asyncio.run(run_load(url, [UPLOAD], concurrency, requests, None))
            before = asyncio.run(httpx_load(url, concurrency, requests))
            ratio = ours["requests_per_s"] / before["requests_per_s"]
            print(
                f"{concurrency:>8}{ours['requests_per_s']:>15.1f}{ours['p99_s']:>8.3f}"
                f"{before['requests_per_s']:>13.1f}{before['p99_s']:>8.3f}{ratio:>7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
