"""Start-up costs measured on the CPU: what a data process imports; what the packed row's layout costs the first compiled step.

**Imports.** Every Ray Data process of the pipeline (read, decode and tokenize tasks, the split
coordinator) imports ``salm.data.processing`` before its first shard. Until ``salm.model`` loaded
``SALM`` lazily, that import pulled in ``salm.model.salm`` (NeMo, transformers, PEFT) as well. Each
repeat times both in fresh processes, in turns: the pipeline's import, then the pipeline's plus the
model's (the old behaviour). The import runs in the child; interpreter start is not counted. Medians
over ``--repeats``.

**Compile** (``--compile``). The tiny SALM's first packed training step (forward + backward) with
compiled layers, and the graphs Dynamo compiled for it. Two versions, each in its own process with a
fresh Inductor cache:

- ``own``: the packed row as ``pack_sequences`` builds it, a tensor of its own;
- ``view``: the same row as a view of an ``(N, H)`` tensor, as it was built before. Dynamo guards on
  a view's base, so the first Qwen3 layer got a graph of its own.

::

    python3 -m bench.startup_cost               # imports only, seconds
    python3 -m bench.startup_cost --compile     # + the two compiled first steps, ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = {
    "data_pipeline": "salm.data.processing",
    "data_pipeline_with_model": "salm.data.processing, salm.model.salm",
}
ROW_LAYOUTS = ("own", "view")


def _child(code: str, env: dict | None = None) -> str:
    """Run ``code`` in a fresh Python from the repository root; its last stdout line."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"a measuring process failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def import_seconds(modules: str) -> float:
    """Seconds ``import modules`` takes in a fresh process."""
    code = f"import time; start = time.perf_counter(); import {modules}; print(time.perf_counter() - start)"
    return float(_child(code))


def measure_imports(repeats: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(repeats):
        for name, modules in IMPORTS.items():  # in turns: drifts hit both
            times[name].append(import_seconds(modules))
    seconds = {name: round(statistics.median(values), 3) for name, values in times.items()}
    return {
        "import_s": seconds,
        "import_s_all": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "import_ratio_with_model_over_without": round(
            seconds["data_pipeline_with_model"] / seconds["data_pipeline"], 2
        ),
    }


def first_compiled_step(row_layout: str) -> dict:
    """In this process: the tiny SALM's first packed, compiled training step; seconds and graphs."""
    import torch
    from torch._dynamo.utils import counters

    import salm.model.salm as salm_module
    from bench.packing_ab import build_model
    from bench.train_batches import make_batches

    if row_layout == "view":
        own_row = salm_module.pack_sequences

        def pack_sequences_as_a_view(*args, **kwargs):
            packed = own_row(*args, **kwargs)
            return dataclasses.replace(packed, embeds=packed.embeds[0].clone().unsqueeze(0))

        salm_module.pack_sequences = pack_sequences_as_a_view
    model = build_model(tiny=True, device=torch.device("cpu"), compiled=True).train()
    model.pack_llm_sequences = True
    batch = make_batches(model, budget_s=8.0, seed=0, tiny=True)[0]
    start = time.perf_counter()
    model.loss(batch)["loss"].backward()
    return {"seconds": time.perf_counter() - start, "graphs": counters["stats"]["unique_graphs"]}


def measure_compile() -> dict:
    steps = {}
    for layout in ROW_LAYOUTS:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            code = (
                f"import json, bench.startup_cost as b; print(json.dumps(b.first_compiled_step({layout!r})))"
            )
            steps[layout] = json.loads(_child(code, env))
        print(f"first compiled step, row {layout}: {steps[layout]}", flush=True)
    return {
        "first_step_s": {name: round(step["seconds"], 1) for name, step in steps.items()},
        "graphs": {name: step["graphs"] for name, step in steps.items()},
        "first_step_ratio_view_over_own": round(steps["view"]["seconds"] / steps["own"]["seconds"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per import (median)")
    parser.add_argument("--compile", action="store_true", help="also time the two compiled first steps")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="a check run: its JSON goes to --out only")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    import torch

    from bench.common import card, write_result

    result = measure_imports(args.repeats)
    print(
        f"data pipeline import: {result['import_s']['data_pipeline']:.2f} s; with the model, as before: "
        f"{result['import_s']['data_pipeline_with_model']:.2f} s "
        f"({result['import_ratio_with_model_over_without']:.2f}x)",
        flush=True,
    )
    if args.compile:
        result |= measure_compile()
        print(
            f"first compiled packed step: row of its own {result['first_step_s']['own']:.1f} s "
            f"({result['graphs']['own']} graphs), row as a view {result['first_step_s']['view']:.1f} s "
            f"({result['graphs']['view']} graphs): {result['first_step_ratio_view_over_own']:.2f}x",
            flush=True,
        )
    write_result(
        "startup_cost",
        {"card": card(torch.device("cpu")), "torch": torch.__version__, "repeats": args.repeats, **result},
        args.out,
        record=not args.smoke,
    )


if __name__ == "__main__":
    main()
