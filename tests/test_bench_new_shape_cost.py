"""bench/new_shape_cost.py: every option set really applied, on frame counts no other set has shown."""

from __future__ import annotations

import json
import statistics

import pytest
from own_process import refused_usage, run_python


def test_each_option_set_is_timed_first_and_again_on_its_own_new_frame_counts(tmp_path) -> None:
    run_python(
        "-m", "bench.new_shape_cost", "--tiny", "--layers", "1", "--batch", "2",
        "--lengths", "3", "--first-frames", "200", "--train", "--out", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "new_shape_cost_train_tiny.json").read_text())
    assert result["train"] is True and result["layers"] == 1
    sets = result["option_sets"]
    assert set(sets) == {
        "channels_last_and_padded_keys", "channels_last_only", "padded_keys_only", "neither",
        "padded_keys_matmul_pointwise", "padded_keys_matmul_subsampling",
    }  # fmt: skip
    every_frames = []
    for timing in sets.values():
        seen = timing["layout_seen"]  # what the modules carried while this set was timed
        assert seen["channels_last_hook"] is timing["channels_last_subsampling"]
        assert seen["key_multiples"] == [timing["pad_attention_keys_to"] or 0]
        matmuls = {None: 0, "pointwise": 2, "stem and pointwise": 3}[timing["matmul_subsampling"]]
        assert seen["subsampling_matmuls"] == matmuls  # what each set asked for: 2 pointwise, and the stem
        assert len(timing["first_s"]) == len(timing["again_s"]) == len(timing["frames"]) == 3
        assert all(s > 0 for s in timing["first_s"] + timing["again_s"])
        cost = statistics.fmean(timing["first_s"]) - statistics.fmean(timing["again_s"])
        assert timing["new_shape_cost_s"] == pytest.approx(cost, abs=1e-4)
        every_frames += timing["frames"]
    assert len({n // 8 for n in every_frames}) == len(every_frames) == 18  # new after subsampling too


def test_op_diff_profiles_a_frame_count_of_its_own_and_ranks_the_ops_that_grew(tmp_path) -> None:
    run_python(
        "-m", "bench.new_shape_cost", "--tiny", "--layers", "1", "--batch", "2", "--lengths", "2",
        "--first-frames", "200", "--sets", "neither", "padded_keys_matmul_subsampling", "--op-diff",
        "--out", str(tmp_path),
    )  # fmt: skip
    sets = json.loads((tmp_path / "new_shape_cost_tiny.json").read_text())["option_sets"]
    assert list(sets) == ["neither", "padded_keys_matmul_subsampling"]
    for timing in sets.values():
        growth = timing["host_op_growth"]
        assert growth and all(
            row["grew_ms"] == pytest.approx(row["first_ms"] - row["again_ms"], abs=2e-3) for row in growth
        )
        assert [row["grew_ms"] for row in growth] == sorted((row["grew_ms"] for row in growth), reverse=True)
        assert len(timing["frames"]) == 2  # the profiled frame count is not among the timed ones
    assert any(row["op"].startswith("aten::") for row in sets["neither"]["host_op_growth"])


def test_a_batch_of_one_is_refused_with_what_to_change(tmp_path) -> None:
    stderr = refused_usage("-m", "bench.new_shape_cost", "--tiny", "--batch", "1", "--out", str(tmp_path))
    assert "--batch >= 2" in stderr
    assert not list(tmp_path.iterdir())
