"""The recipe's fused AdamW (``model.optimizer.fused``, the default) under DeepSpeed ZeRO-2 makes
the update torch's default AdamW makes, to rounding, in the one fused kernel.

Run in a subprocess: DeepSpeed needs a process group, which must not leak into other tests.
"""

import json
from pathlib import Path

import pytest
from own_process import run_python
from test_train_recipe import FILLED

from salm.errors import SALMConfigError
from salm.train.recipe import load_recipe

SCRIPT = r"""
import json, sys
import torch
from bench.common import init_single_process_group, recipe, with_canary_training_settings, write_llm_dir
from bench.train_batches import build_tokenizer_model, make_batches
from salm.train.engine import build_model, wrap_in_deepspeed

init_single_process_group()
cfg = with_canary_training_settings(recipe(write_llm_dir(sys.argv[1], tiny=True), tiny=True))
batches = make_batches(build_tokenizer_model(cfg), 12.0, 3, tiny=True)
fused_calls = 0
fused_adamw = torch._fused_adamw_


def counted(*args, **kwargs):
    global fused_calls
    fused_calls += 1
    return fused_adamw(*args, **kwargs)


torch._fused_adamw_ = counted
result = {}
for fused in (True, False):
    cfg.model.optimizer.fused = fused
    fused_calls = 0
    engine, _ = wrap_in_deepspeed(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    losses = []
    for step, batch in enumerate(batches * 2):
        torch.manual_seed(step)  # the same dropout masks for both optimizers
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    trained = [p.detach().float().flatten() for p in engine.module.parameters() if p.requires_grad]
    result[str(fused)] = {
        "losses": losses,
        "weights": torch.cat(trained).tolist(),
        "fused_kernel_calls": fused_calls,
        "zero_stage": engine.zero_optimization_stage(),
    }
print(json.dumps(result))
"""


def test_fused_adamw_under_zero2_trains_like_torchs_default_adamw(tmp_path: Path) -> None:
    done = run_python("-c", SCRIPT, str(tmp_path / "llm"))
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    fused, default = runs["True"], runs["False"]
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
