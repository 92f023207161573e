"""The engine's gradient norm (``salm.train.grad_norm``) is DeepSpeed's, in fused kernels.

Run in a subprocess: DeepSpeed needs a process group, which must not leak into other tests.
"""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
import torch
from bench.common import init_single_process_group, recipe, write_llm_dir
from bench.train_batches import build_tokenizer_model, make_batches
from salm.train.engine import build_model, wrap_in_deepspeed
from salm.train.grad_norm import use_deepspeed_grad_norm

init_single_process_group()
cfg = recipe(write_llm_dir(sys.argv[1], tiny=True), tiny=True)
torch.manual_seed(0)
model = build_model(cfg, torch.device("cpu"))
engine, _ = wrap_in_deepspeed(cfg, model, torch.device("cpu"))
optimizer = engine.optimizer
patched = "get_grad_norm_direct" in vars(optimizer)
batch = make_batches(build_tokenizer_model(cfg), 12.0, 3, tiny=True)[0]
engine.backward(engine(batch)["loss"])
ours = float(optimizer.scaled_global_norm())
use_deepspeed_grad_norm(optimizer)
theirs = float(optimizer.scaled_global_norm())
print(json.dumps({"patched": patched, "ours": ours, "theirs": theirs, "type": type(optimizer).__name__}))
"""


def test_fused_gradient_norm_equals_deepspeeds_loop(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "llm")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    norms = json.loads(result.stdout.strip().splitlines()[-1])
    assert norms["type"] == "DeepSpeedZeroOptimizer" and norms["patched"]
    assert norms["theirs"] > 0
    assert abs(norms["ours"] - norms["theirs"]) <= 1e-5 * norms["theirs"]
