"""ZeRO-1 and ZeRO-2 train the recipe's model to the same weights on one rank; only ZeRO-2 hooks
every gradient tensor (the per-tensor Python that ``bench/deepspeed_host_cost.py`` prices).

Run in a subprocess: DeepSpeed needs a process group, which must not leak into other tests.
"""

import json
from pathlib import Path

from own_process import run_python

SCRIPT = r"""
import json, sys
import torch
from bench.common import init_single_process_group, recipe, with_canary_training_settings, write_llm_dir
from bench.train_batches import build_tokenizer_model, make_batches
from salm.train.engine import build_model, wrap_in_deepspeed

init_single_process_group()
cfg = with_canary_training_settings(recipe(write_llm_dir(sys.argv[1], tiny=True), tiny=True))
batches = make_batches(build_tokenizer_model(cfg), 12.0, 3, tiny=True)
result = {}
for stage in (1, 2):
    cfg.deepspeed.zero_stage = stage
    engine, _ = wrap_in_deepspeed(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    losses = []
    for step, batch in enumerate(batches * 2):
        torch.manual_seed(step)  # the same dropout masks for both stages
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    trained = [p.detach().float().flatten() for p in engine.module.parameters() if p.requires_grad]
    result[stage] = {
        "losses": losses,
        "weights": torch.cat(trained).tolist(),
        "tensors": len(trained),
        "hooks": len(engine.optimizer._grad_acc_hooks),
        "type": type(engine.optimizer).__name__,
    }
print(json.dumps(result))
"""


def test_zero1_trains_like_zero2_without_a_hook_per_gradient_tensor(tmp_path: Path) -> None:
    done = run_python("-c", SCRIPT, str(tmp_path / "llm"))
    stages = json.loads(done.stdout.strip().splitlines()[-1])
    zero1, zero2 = stages["1"], stages["2"]
    assert zero1["type"] == zero2["type"] == "DeepSpeedZeroOptimizer"
    assert zero2["hooks"] == zero2["tensors"] > 0 and zero1["hooks"] == 0
    assert zero1["losses"][0] != zero1["losses"][-1]  # it trained
    assert zero1["losses"] == zero2["losses"]
    assert zero1["weights"] == zero2["weights"]
