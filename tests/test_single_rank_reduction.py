"""On one rank, the engine skips DeepSpeed's bucket all-reduce (``salm.train.single_rank_reduction``):
the same weights as DeepSpeed's own reduction, without its concatenation and per-tensor copies.

Run in a subprocess: DeepSpeed needs a process group, which must not leak into other tests.
"""

import json
from pathlib import Path

from own_process import run_python

SCRIPT = r"""
import json, sys
from collections import Counter
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from bench.common import init_single_process_group, recipe, with_canary_training_settings, write_llm_dir
from bench.train_batches import build_tokenizer_model, make_batches
from salm.train.engine import build_model, wrap_in_deepspeed
from salm.train.single_rank_reduction import use_deepspeed_reduction


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


init_single_process_group()
cfg = with_canary_training_settings(recipe(write_llm_dir(sys.argv[1], tiny=True), tiny=True))
batches = make_batches(build_tokenizer_model(cfg), 12.0, 3, tiny=True)[:2]
result = {}
for name in ("skipped", "deepspeed"):
    engine, _ = wrap_in_deepspeed(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    result[f"{name}_patched"] = "allreduce_and_copy" in vars(engine.optimizer)
    if name == "deepspeed":
        use_deepspeed_reduction(engine.optimizer)
    for step in range(3):
        for batch in batches:
            loss = engine(batch)["loss"]
            with CountOps() as counted:
                engine.backward(loss)
            engine.step()
    result[f"{name}_backward_ops"] = {op: counted.ops[op] for op in ("cat", "copy_", "div_")}
    result[f"{name}_weights"] = [p.detach().float().flatten().tolist() for p in engine.module.parameters() if p.requires_grad]
print(json.dumps(result))
"""


def test_skipping_the_reduction_on_one_rank_keeps_deepspeeds_weights(tmp_path: Path) -> None:
    result = json.loads(run_python("-c", SCRIPT, str(tmp_path / "llm")).stdout.strip().splitlines()[-1])
    assert result["skipped_patched"] and result["deepspeed_patched"]  # the engine applies it on one rank
    # DeepSpeed's reduction: one flattened bucket, divided by the world size (1), copied back per tensor.
    theirs, ours = result["deepspeed_backward_ops"], result["skipped_backward_ops"]
    trainable = len(result["skipped_weights"])
    assert theirs["cat"] >= 1 and theirs["copy_"] >= trainable and theirs["div_"] >= 1
    assert ours["cat"] == 0 and ours["div_"] == 0 and ours["copy_"] <= theirs["copy_"] - trainable
    # Three steps over two batches with clipping and AdamW: bit for bit the same weights.
    assert result["skipped_weights"] == result["deepspeed_weights"]
