"""bench/multi_gpu.py on CPU workers: 1 worker accumulating 2 micro-batches and 2 data-parallel
workers taking one each make the same optimizer steps, so their per-step losses must agree."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_one_worker_with_accumulation_and_two_workers_agree_step_by_step(tmp_path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.multi_gpu", "--tiny", "--zero-stages", "2", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "multi_gpu_zero2_tiny.json").read_text())
    single, double = result["runs"]["zero2_gpus1"], result["runs"]["zero2_gpus2"]
    assert len(single["losses"]) == len(double["losses"]) == 6  # 2 buckets x (1 warm-up + 2 timed passes)
    assert single["losses"][-1] < single["losses"][0]  # the steps really update the weights
    assert double["max_abs_loss_diff_vs_1gpu"] < 1e-3, (single["losses"], double["losses"])
    assert double["scaling_efficiency"] > 0 and double["audio_s_per_s"] > 0
    assert not (
        REPO / "bench" / "results" / "multi_gpu_zero2_tiny.json"
    ).exists()  # smoke runs are not results
