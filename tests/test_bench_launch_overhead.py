"""bench/compile_launch_overhead.py's plumbing: a crashing mode is a row of the table, not the end of the run."""

from __future__ import annotations

import sys

import pytest

from bench.compile_launch_overhead import parse_inductor_options, run_isolated


def test_a_segfaulting_mode_is_reported_with_its_signal_and_last_words() -> None:
    crash = (
        "import os, signal, sys; print('compiling', file=sys.stderr); os.kill(os.getpid(), signal.SIGSEGV)"
    )
    result = run_isolated([sys.executable, "-c", crash], timeout_s=60)
    assert result["failed"] == "killed by signal 11"
    assert "compiling" in result["stderr_tail"]


def test_a_finished_mode_returns_its_result_line_and_a_hung_one_times_out() -> None:
    ok = "print('log line'); print('RESULT {\"seconds\": 2.5}')"
    assert run_isolated([sys.executable, "-c", ok], timeout_s=60) == {"seconds": 2.5}
    slow = "import sys, time; print('pass 0: 110 s', file=sys.stderr, flush=True); time.sleep(30)"
    hung = run_isolated([sys.executable, "-c", slow], timeout_s=2)
    assert hung == {"failed": "timed out after 2 s", "stderr_tail": ["pass 0: 110 s"]}


def test_inductor_options_are_typed_and_malformed_ones_are_refused() -> None:
    parsed = parse_inductor_options(["graph_partition=False", "triton.cudagraph_trees=0", "mode=max"])
    assert parsed == {"graph_partition": False, "triton.cudagraph_trees": 0, "mode": "max"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_inductor_options(["graph_partition"])
