"""Train the tiny recipe (with the canary recipe's training settings) for a few steps under
DeepSpeed, once per variant of the recipe, in a process of its own (DeepSpeed needs a process
group, which must not leak into other tests); returns what each run trained to."""

from __future__ import annotations

import json
from pathlib import Path

from own_process import run_python

SCRIPT = r"""
import json, sys
import torch
from omegaconf import OmegaConf
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
for name, overrides in json.loads(sys.argv[2]).items():
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    fused_calls = 0
    engine, _ = wrap_in_deepspeed(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    losses = []
    for step, batch in enumerate(batches * 2):
        torch.manual_seed(step)  # the same dropout masks in every run
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    trained = [p.detach().float().flatten() for p in engine.module.parameters() if p.requires_grad]
    result[name] = {
        "losses": losses,
        "weights": torch.cat(trained).tolist(),
        "tensors": len(trained),
        "hooks": len(getattr(engine.optimizer, "_grad_acc_hooks", [])),
        "type": type(engine.optimizer).__name__,
        "zero_stage": engine.zero_optimization_stage(),
        "fused_kernel_calls": fused_calls,
    }
print(json.dumps(result))
"""


def train_variants(llm_dir: Path, variants: dict[str, dict]) -> dict[str, dict]:
    """``variants``: name -> recipe overrides (dotted keys), applied in order, each on top of the last.
    Per name: ``losses``, trained ``weights`` (flat), ``tensors``, ZeRO ``hooks``, the optimizer's
    ``type``, ``zero_stage`` and how many times torch's fused AdamW kernel ran (``fused_kernel_calls``)."""
    done = run_python("-c", SCRIPT, str(llm_dir), json.dumps(variants))
    return json.loads(done.stdout.strip().splitlines()[-1])
