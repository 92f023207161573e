"""bench/startup_cost.py: the data pipeline's import against the same with the model, in fresh processes."""

from __future__ import annotations

import json

from own_process import refused_usage, run_python


def test_both_imports_are_timed_in_turns_and_the_model_costs_more(tmp_path) -> None:
    done = run_python("-m", "bench.startup_cost", "--repeats", "2", "--smoke", "--out", str(tmp_path))
    result = json.loads((tmp_path / "startup_cost.json").read_text())
    seconds = result["import_s"]
    assert all(len(times) == 2 and min(times) > 0 for times in result["import_s_all"].values())
    assert seconds["data_pipeline_with_model"] > seconds["data_pipeline"]  # NeMo, transformers, PEFT
    ratio = round(seconds["data_pipeline_with_model"] / seconds["data_pipeline"], 2)
    assert result["import_ratio_with_model_over_without"] == ratio
    assert "first_step_s" not in result  # --compile not asked for
    assert f"({ratio:.2f}x)" in done.stdout


def test_bad_arguments_get_a_clear_error(tmp_path) -> None:
    stderr = refused_usage("-m", "bench.startup_cost", "--repeats", "0", "--out", str(tmp_path))
    assert "--repeats must be >= 1" in stderr
