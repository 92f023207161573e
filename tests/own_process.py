"""Run Python in a process of its own, from the repository root, for tests whose code must not
share this one: a DeepSpeed process group, a Ray session or Dynamo's caches would leak into the
tests after them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python *args``; fails the test with the end of its stderr unless it exits 0."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def refused_usage(*args: str) -> str:
    """``python *args`` must stop at its argument check: exit 2 (argparse's) with one message and no
    traceback. Returns its stderr, for the test to check the message."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr
