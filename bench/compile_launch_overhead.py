"""Inductor's launch-overhead options on the compiled layers of the canary-shape training step (GPU).

``trainer.compile_layers`` compiles every Conformer and Qwen3 layer with Inductor's default mode.
The profile of that step (BENCHMARKS.md, "Where the GPU waits for the host") leaves ~1.3 s of GPU
idle per 5 steps in the forward and backward: the compiled regions launching their kernels one at a
time from Inductor's Python wrapper. Two Inductor options attack that:

- CUDA graphs (``triton.cudagraphs``, what ``mode="reduce-overhead"`` turns on) replay a region's
  kernels as one graph per input shape;
- ``cpp_wrapper`` generates the wrapper that launches the kernels in C++ instead of Python.

This script trains the canary-qwen-2.5b shape (random weights, the same 5 bucketed batches as
``bench/train_throughput.py``) in a plain AdamW loop with bf16 autocast, its layers compiled as
``salm.model.compile`` compiles them, in each of ``--modes``:

- ``none``: every layer with Inductor's default options (the baseline);
- ``cpp_wrapper``: every layer with Inductor's C++ wrapper (what the canary recipe's
  ``trainer.compile_options`` sets since it bought 1.12-1.15x, BENCHMARKS.md);
- ``encoder`` / ``llm``: CUDA graphs on the Conformer layers / on the Qwen3 layers only;
- ``both``: CUDA graphs on all of them.

Each mode runs in its own process: a crash in one (torch 2.11 segfaulted in the Qwen3 layers'
backward, BENCHMARKS.md) is reported as a row of the table, and no mode inherits another's compiled
code. ``--inductor KEY=VALUE`` passes Inductor options to every mode (e.g. ``graph_partition=False``)::

    source bench/device_setup.sh; python3 -m bench.compile_launch_overhead --out $OUT
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import card, peak_gb, recipe, timed, write_llm_dir, write_result

MODES = ["none", "cpp_wrapper", "encoder", "llm", "both"]
RESULT_PREFIX = "RESULT "


def parse_inductor_options(pairs: list[str]) -> dict:
    """``["graph_partition=False", "triton.cudagraph_trees=False"]`` -> Inductor's options dict."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--inductor takes KEY=VALUE (e.g. graph_partition=False), not {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a string option
    return options


def run_isolated(command: list[str], timeout_s: float) -> dict:
    """Run ``command``; its ``RESULT {json}`` line, or why there is none (crash, timeout, error)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as timeout:
        # Its last words say how far it got (which passes ran): on an H200 both modes once timed out
        # at 185 s with nothing else to show.
        return {"failed": f"timed out after {timeout_s:.0f} s", "stderr_tail": last_lines(timeout.stderr)}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
    return {"failed": how, "stderr_tail": last_lines(done.stderr)}


def last_lines(text: str | bytes | None, count: int = 12) -> list[str]:
    """The last ``count`` non-blank lines of a child's output (a timeout hands it over as bytes)."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return [line for line in (text or "").splitlines() if line.strip()][-count:]


def train_one_mode(mode: str, options: dict, budget_s: float, passes: int) -> dict:
    """Child process: compile the layers as ``mode`` says, time ``passes`` passes."""
    from torch._dynamo.utils import counters

    from bench.train_batches import make_batches
    from bench.train_throughput import full_vocab_loss, to_device
    from salm.model.compile import keep_conv1d_backward_dynamic, repeated_layers
    from salm.train.engine import build_model

    device = torch.device("cuda")
    cfg = recipe(write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=False), tiny=False)
    cfg.trainer.compile_layers = False  # compiled below, per mode
    model = build_model(cfg, device)
    model.train()
    keep_conv1d_backward_dynamic()
    encoder_layers = len(model.perception.encoder.layers)
    for index, layer in enumerate(repeated_layers(model)):
        in_encoder = index < encoder_layers
        graphs = mode == "both" or (mode == "encoder" and in_encoder) or (mode == "llm" and not in_encoder)
        mode_options = {"triton.cudagraphs": graphs, "cpp_wrapper": mode == "cpp_wrapper"}
        layer.compile(dynamic=True, options={**options, **mode_options})
    batches = make_batches(model, budget_s, 0, False)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def step(batch: dict) -> None:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead from here
        full_vocab_loss(model, to_device(batch, device), autocast).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = [timed(lambda: [step(b) for b in batches], device) for _ in range(passes)]
    for number, s in enumerate(seconds):
        print(f"[{mode}] pass {number}: {s:.3f} s", file=sys.stderr, flush=True)
    timed_passes = sorted(seconds[2:]) or seconds  # pass 0 compiles, pass 1 records the graphs
    return {
        "seconds": timed_passes[len(timed_passes) // 2],
        "first_passes_s": [round(s, 1) for s in seconds[:2]],
        "peak_mem_gb": peak_gb(device),
        "cudagraph_counters": {k: v for k, v in counters["inductor"].items() if "cudagraph" in k},
    }


def print_table(rows: dict) -> None:
    baseline = rows.get("none", {}).get("seconds")
    print(f"\n{'mode':<16}{'s/pass':>9}{'x none':>8}{'peak GB':>9}  first passes (compile, record)")
    for mode, row in rows.items():
        if "failed" in row:
            print(f"{mode:<16}{'failed: ' + row['failed']:>26}")
            continue
        speedup = baseline / row["seconds"] if baseline else float("nan")
        print(
            f"{mode:<16}{row['seconds']:>9.3f}{speedup:>8.2f}{row['peak_mem_gb']:>9.1f}  {row['first_passes_s']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES, help="what each run changes")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE", help="Inductor options")
    parser.add_argument("--budget-s", type=float, default=640.0, help="audio seconds per batch")
    parser.add_argument("--passes", type=int, default=4, help="passes per mode; the first two are not timed")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per mode")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    options = parse_inductor_options(args.inductor)
    if args.child:
        result = train_one_mode(args.child, options, args.budget_s, args.passes)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark times CUDA kernels: run it on the GPU machine (BENCHMARKS.md).")
    rows = {}
    for mode in args.modes:
        command = [
            sys.executable,
            "-X",
            "faulthandler",
            "-m",
            "bench.compile_launch_overhead",
            "--child",
            mode,
        ]
        command += [
            "--budget-s",
            str(args.budget_s),
            "--passes",
            str(args.passes),
            "--inductor",
            *args.inductor,
        ]
        rows[mode] = run_isolated(command, args.timeout_s)
        print(f"{mode}: {json.dumps(rows[mode])}", flush=True)
    print_table(rows)
    write_result(
        "compile_launch_overhead",
        {
            "card": card(torch.device("cuda")),
            "inductor_options": options,
            "budget_s": args.budget_s,
            "modes": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
