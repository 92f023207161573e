"""bench/deepspeed_host_cost.py: the canary recipe's tensor list at narrow widths, every path timed."""

from __future__ import annotations

import json

import pytest
from own_process import run_python


def test_each_stage_times_the_recipes_1310_tensors_and_only_zero2_hooks_them(tmp_path) -> None:
    done = run_python(
        "-m", "bench.deepspeed_host_cost", "--stages", "1", "2", "--width", "32",
        "--steps", "2", "--warmup", "1", "--smoke", "--out", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "deepspeed_host_cost.json").read_text())
    assert result["trainable_tensors"] == 1310 and result["width"] == 32  # 32 + 28 layers, LoRA r 128
    rows = result["rows"]
    assert list(rows) == ["torch", "zero1", "zero2"]
    assert rows["zero2"]["gradient_hooks"] == 1310 and rows["zero1"]["gradient_hooks"] == 0
    assert rows["zero1"]["optimizer"] == rows["zero2"]["optimizer"] == "DeepSpeedZeroOptimizer"
    for row in rows.values():
        assert min(row["forward"], row["backward"], row["step"]) > 0
        assert row["backward_and_step"] == pytest.approx(row["backward"] + row["step"])
    assert "backward + step over torch" in done.stdout
