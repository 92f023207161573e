"""bench/dropout_host_cost.py: both dropout kernels compiled, checked against eager, timed in turns."""

from __future__ import annotations

import json

from own_process import refused_usage, run_python


def test_both_dropout_kernels_are_checked_against_eager_and_timed_in_one_run(tmp_path) -> None:
    done = run_python(
        "-m", "bench.dropout_host_cost", "--pairs", "3", "--steps", "4", "--repeats", "2", "--warmup", "1",
        "--python-wrapper", "--smoke", "--out", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "dropout_host_cost.json").read_text())
    assert result["same_as_eager"] == {"custom_op": True, "aten_fallback": True}
    assert result["wrapper"] == "python" and result["pairs"] == 3
    assert all(len(times) == 2 and min(times) > 0 for times in result["step_us_all"].values())
    steps = result["step_us"]
    assert result["ratio_custom_op_over_aten"] == round(steps["custom_op"] / steps["aten_fallback"], 3)
    assert f"{result['saved_us_per_dropout']:.1f} us less per dropout" in done.stdout


def test_bad_arguments_get_a_clear_error(tmp_path) -> None:
    stderr = refused_usage("-m", "bench.dropout_host_cost", "--p", "1.0", "--out", str(tmp_path))
    assert "--p must be between 0 and 1" in stderr
