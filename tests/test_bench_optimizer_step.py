"""bench/optimizer_step.py on the CPU: both AdamW implementations are timed over one flat partition
and end on the same weights (to rounding), so its GPU ratio compares like with like."""

import json

from own_process import run_python


def test_foreach_and_fused_adamw_are_timed_and_agree(tmp_path) -> None:
    run_python(
        "-m", "bench.optimizer_step", "--cpu", "--params", "200000", "--steps", "3", "--smoke",
        "--out", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "optimizer_step_cpu.json").read_text())
    assert result["params"] == 200000
    assert result["foreach_ms"] > 0 and result["fused_ms"] > 0
    assert result["ratio_fused_vs_foreach"] == result["foreach_ms"] / result["fused_ms"]
    assert 0 <= result["max_weight_difference"] < 1e-6
