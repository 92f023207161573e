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
