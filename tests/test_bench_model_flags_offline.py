"""bench/model_flags_offline.py: two models from one recipe, timed in turns, on real speech."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bench.model_flags_offline", "--tiny", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_two_models_take_turns_and_every_batch_is_timed(tmp_path) -> None:
    out = tmp_path / "flags.json"
    done = run_bench(
        "--b-set", "perception.pad_attention_keys_to=8", "--batch-sizes", "1", "2",
        "--requests", "3", "--repeats", "2", "--clips", "2", "--sentences-per-clip", "1",
        "--max-new-tokens", "4", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["b_set"] == ["perception.pad_attention_keys_to=8"] and result["a_set"] == []
    assert len(result["clip_s"]) == 2 and all(s > 0.5 for s in result["clip_s"])  # real flite speech
    order = [(r["repeat"], r["model"], r["batch_size"]) for r in result["rows"]]
    assert order == [(rep, m, b) for rep in (0, 1) for m in ("A", "B") for b in (1, 2)]
    for row in result["rows"]:  # 3 requests: batches of 1, 1, 1 or of 2, 1
        assert len(row["seconds_per_batch"]) == (3 if row["batch_size"] == 1 else 2)
        assert all(s > 0 for s in row["seconds_per_batch"])
        assert len(row["first_pass_s"]) == 2 and all(s > 0 for s in row["first_pass_s"])  # one per clip
    assert [line["batch_size"] for line in result["summary"]] == [1, 2]
    for model in ("A", "B"):  # each model's first row saw the lengths first, its second row again
        first, again = [r["first_pass_s"] for r in result["rows"] if r["model"] == model][:2]
        assert result["first_seen"][model] == {
            "first_s": pytest.approx(statistics.median(first), abs=1e-4),
            "again_s": pytest.approx(statistics.median(again), abs=1e-4),
        }
    for line in result["summary"]:  # means over both repeats' batches of that size
        mean = {
            m: statistics.fmean(s for r in result["rows"] if (r["model"], r["batch_size"]) == (m, line["batch_size"])
                                for s in r["seconds_per_batch"])
            for m in ("A", "B")
        }  # fmt: skip
        assert line["a_s"] == pytest.approx(mean["A"], abs=1e-4)
        assert line["b_s"] == pytest.approx(mean["B"], abs=1e-4)
        assert line["b_over_a"] == pytest.approx(mean["B"] / mean["A"], abs=1e-3)


def test_identical_models_are_refused_before_anything_is_built(tmp_path) -> None:
    done = run_bench("--b-set", "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2
    assert "nothing to compare" in done.stderr
    assert not (tmp_path / "x.json").exists()
