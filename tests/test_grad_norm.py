"""The engine's gradient clipping (``salm.train.grad_norm``) is DeepSpeed's: the norm in fused kernels, the
clip without reading the norm back.

Run in a subprocess: DeepSpeed needs a process group, which must not leak into other tests.
"""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from own_process import run_python

SCRIPT = r"""
import json, sys
import torch
from bench.common import init_single_process_group, recipe, write_llm_dir
from bench.train_batches import build_tokenizer_model, make_batches
from salm.train.engine import build_model, wrap_in_deepspeed
from salm.train.grad_norm import use_deepspeed_gradient_clipping

init_single_process_group()
cfg = recipe(write_llm_dir(sys.argv[1], tiny=True), tiny=True)
torch.manual_seed(0)
model = build_model(cfg, torch.device("cpu"))
engine, _ = wrap_in_deepspeed(cfg, model, torch.device("cpu"))
optimizer = engine.optimizer
patched = "get_grad_norm_direct" in vars(optimizer)
batch = make_batches(build_tokenizer_model(cfg), 12.0, 3, tiny=True)[0]
engine.backward(engine(batch)["loss"])
grads, params = list(optimizer.averaged_gradients[0]), optimizer.params_in_partition[0]
poisoned = {bad: [grads[0].clone().fill_(float(bad))] + grads[1:] for bad in ("nan", "inf")}


def norms():
    return [float(optimizer.scaled_global_norm())] + [
        float(optimizer.get_grad_norm_direct(g, params)) for g in poisoned.values()
    ]


ours = norms()
use_deepspeed_gradient_clipping(optimizer)
theirs = norms()
print(json.dumps({"patched": patched, "ours": ours, "theirs": theirs, "type": type(optimizer).__name__}))
"""


def test_fused_gradient_norm_equals_deepspeeds_loop(tmp_path: Path) -> None:
    result = run_python("-c", SCRIPT, str(tmp_path / "llm"))
    norms = json.loads(result.stdout.strip().splitlines()[-1])
    assert norms["type"] == "DeepSpeedZeroOptimizer" and norms["patched"]
    (ours, *ours_invalid), (theirs, *theirs_invalid) = norms["ours"], norms["theirs"]
    assert theirs > 0
    assert abs(ours - theirs) <= 1e-5 * theirs
    assert ours_invalid == theirs_invalid == [-1.0, -1.0]  # a NaN, then an inf gradient: DeepSpeed's sentinel


@pytest.mark.parametrize("norm", [3.0, 0.25, float("inf"), float("nan"), -1.0])  # clips; not; invalid x 3
@pytest.mark.parametrize("clip_grad", [1.0, 0.0])
def test_clipping_on_the_device_scales_gradients_as_deepspeed_does(norm: float, clip_grad: float) -> None:
    """DeepSpeed reads an invalid norm back to clip by infinity; ours decides on the device, same numbers."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from salm.train.grad_norm import _clip_on_device

    optimizer = SimpleNamespace(clip_grad=clip_grad, loss_scale=1.0, device=torch.device("cpu"))
    torch.manual_seed(0)
    grads = [torch.randn(7), [torch.randn(3), torch.randn(5)]]  # a flat group, and one in parts
    theirs, ours = copy.deepcopy(grads), copy.deepcopy(grads)
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(optimizer, theirs, torch.tensor(norm))
    _clip_on_device(optimizer, ours, torch.tensor(norm))
    flat = [t for g in grads for t in (g if isinstance(g, list) else [g])]
    flat_theirs = [t for g in theirs for t in (g if isinstance(g, list) else [g])]
    flat_ours = [t for g in ours for t in (g if isinstance(g, list) else [g])]
    for before, expected, got in zip(flat, flat_theirs, flat_ours, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        if clip_grad and norm == 3.0:
            assert got.abs().sum() < before.abs().sum()  # the case that clips did clip
