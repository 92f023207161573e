"""bench/serve_load.py's client counts what the server answered: latencies and audio of successes only."""

import asyncio
import itertools
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.serve_load import Clip, free_port, run_load


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
