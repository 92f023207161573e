"""ZeRO-1 and ZeRO-2 train the recipe's model to the same weights on one rank; only ZeRO-2 hooks
every gradient tensor (the per-tensor Python that ``bench/deepspeed_host_cost.py`` prices)."""

from pathlib import Path

from engine_runs import train_variants


def test_zero1_trains_like_zero2_without_a_hook_per_gradient_tensor(tmp_path: Path) -> None:
    stages = train_variants(
        tmp_path / "llm", {"1": {"deepspeed.zero_stage": 1}, "2": {"deepspeed.zero_stage": 2}}
    )
    zero1, zero2 = stages["1"], stages["2"]
    assert zero1["type"] == zero2["type"] == "DeepSpeedZeroOptimizer"
    assert zero2["hooks"] == zero2["tensors"] > 0 and zero1["hooks"] == 0
    assert zero1["losses"][0] != zero1["losses"][-1]  # it trained
    assert zero1["losses"] == zero2["losses"]
    assert zero1["weights"] == zero2["weights"]
