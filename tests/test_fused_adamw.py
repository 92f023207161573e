"""The recipe's fused AdamW (``model.optimizer.fused``, the default) under DeepSpeed ZeRO-2 makes
the update torch's default AdamW makes, to rounding, in the one fused kernel."""

from pathlib import Path

import pytest
from engine_runs import train_variants
from test_train_recipe import FILLED

from salm.errors import SALMConfigError
from salm.train.recipe import load_recipe


def test_fused_adamw_under_zero2_trains_like_torchs_default_adamw(tmp_path: Path) -> None:
    runs = train_variants(
        tmp_path / "llm",
        {"fused": {"model.optimizer.fused": True}, "default": {"model.optimizer.fused": False}},
    )
    fused, default = runs["fused"], runs["default"]
    steps = len(fused["losses"])
    assert fused["zero_stage"] == default["zero_stage"] == 2
    assert fused["fused_kernel_calls"] == steps and default["fused_kernel_calls"] == 0
    assert fused["losses"][0] != fused["losses"][-1]  # it trained
    # On this repository's CPU the two differ in 1 of 260,864 weights, by 2e-9.
    assert fused["losses"] == pytest.approx(default["losses"], rel=1e-6)
    assert fused["weights"] == pytest.approx(default["weights"], abs=1e-6)


def test_optimizer_fused_must_be_a_bool() -> None:
    with pytest.raises(SALMConfigError, match="`model.optimizer.fused` must be true or false"):
        load_recipe("tiny", [*FILLED, "model.optimizer.fused=sometimes"])
