"""The data benchmark runs end to end on a tiny corpus and prints its ratio against Lhotse."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_data_throughput_benchmark_prints_its_ratio(tmp_path) -> None:
    out = tmp_path / "result.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "data_throughput.py"),
            "--utterances",
            "40",
            "--shard-size",
            "20",
            "--max-duration",
            "30",
            "--num-buckets",
            "3",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "ratio" in completed.stdout and "vs Lhotse" in completed.stdout
    result = json.loads(out.read_text())
    assert result["ratio_vs_lhotse"] > 0 and result["audio_s_per_s"] > 0
    assert 0 <= result["padding_ratio_bucketed"] <= result["padding_ratio_unbucketed"]
    # The pipeline's own rate: every row but the first, over the time from the first row to the last.
    ours = result["ours"]
    assert ours["rows_audio_s_per_s"] == result["rows_audio_s_per_s"] > 0
    assert 0 < ours["first_row_s"] <= ours["first_batch_s"]
