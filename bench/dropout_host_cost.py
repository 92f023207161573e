"""What one dropout costs the host inside a compiled layer: the recipe's Python custom op against
ATen's kernel called from Inductor's own wrapper.

Why: the recipe's compiled layers draw their dropout masks through ``salm::native_dropout``, a
``torch.library`` custom op with a Python body (``salm.model.dropout``). The H200 profile of the
recipe's step (BENCHMARKS.md, "The sync-free step on the GPU") counted 1,400 calls per pass and
114 ms of host time in them, in a step whose GPU waits for the host a third of the time.
``AtenKernelDropout`` compiled with Inductor's ``fallback_random`` draws the same masks with the
same kernel, called from the generated wrapper without Python.

This times forward + backward of a stack of ``--pairs`` (``Linear``, dropout) pairs, small enough to
be bound by the host on any device, compiled as the recipe compiles its layers (``compile_layers``:
``dynamic=True``, the C++ wrapper unless ``--python-wrapper``), once per implementation in one
process, the two taking turns in every repeat:

- ``custom_op``: ``EagerKernelDropout``, the recipe's;
- ``aten_fallback``: ``AtenKernelDropout`` with ``fallback_random``.

It checks that each compiled stack gives its eager stack's output for the same seed (same masks),
then prints microseconds per step and, per dropout call, what the ATen path saves::

    python3 -m bench.dropout_host_cost --pairs 16 --out $OUT

The GPU step itself is priced by ``bench/train_throughput.py --variants compiled_fresh_lengths
compiled_fresh_lengths_aten_dropout``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bench.common import card, timed, write_result
from salm.model.compile import compile_layers
from salm.model.dropout import AtenKernelDropout

# name: (the dropout class the stack is built with, Inductor options over the recipe's)
# compile_layers turns a plain nn.Dropout into the recipe's EagerKernelDropout.
IMPLEMENTATIONS = {
    "custom_op": (nn.Dropout, {}),
    "aten_fallback": (AtenKernelDropout, {"fallback_random": True}),
}
PROFILED_CALLS_PER_PASS = 1400  # salm::native_dropout in the H200 profile of the recipe's 5-step pass


class DropoutStack(nn.Module):
    """``pairs`` x (``Linear(width, width)``, dropout). A module of its own, not ``nn.Sequential``: Dynamo
    does not trace a ``torch.nn`` module's own ``forward`` as the compiled frame, only what it calls."""

    def __init__(self, dropout_class: type[nn.Dropout], pairs: int, width: int, p: float) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(pairs))
        self.dropouts = nn.ModuleList(dropout_class(p) for _ in range(pairs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear, dropout in zip(self.linears, self.dropouts, strict=True):
            x = dropout(linear(x))
        return x


def dropout_stack(dropout_class: type[nn.Dropout], pairs: int, width: int, p: float, device: torch.device):
    """A ``DropoutStack`` in train mode, with the same weights for any dropout class."""
    torch.manual_seed(0)
    return DropoutStack(dropout_class, pairs, width, p).to(device).train()


def training_step(stack: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = stack(x)
    out.square().mean().backward()
    return out


def same_as_eager(eager: nn.Module, compiled: nn.Module, x: torch.Tensor) -> bool:
    """Whether the compiled stack gives the eager stack's output for the same seed: the same masks."""
    outputs = []
    for stack in (eager, compiled):
        torch.manual_seed(1234)
        outputs.append(training_step(stack, x).detach())
    return torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """Per implementation: its check against eager, then microseconds per step (median of repeats)."""
    x = torch.randn(args.rows, args.width, device=device)
    stacks, checks = {}, {}
    for name, (dropout_class, options) in IMPLEMENTATIONS.items():
        eager = dropout_stack(dropout_class, args.pairs, args.width, args.p, device)
        compiled = copy.deepcopy(eager)
        compile_layers([compiled], {"cpp_wrapper": not args.python_wrapper, **options})
        checks[name] = same_as_eager(eager, compiled, x)  # also its first call: the compile
        stacks[name] = compiled
        print(f"{name}: compiled; same output as eager for the same seed: {checks[name]}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in stacks}
    for _ in tqdm(range(args.repeats), desc="repeats", unit="repeat"):
        for name, stack in stacks.items():  # the implementations take turns: drifts hit both
            for _ in range(args.warmup):
                training_step(stack, x)
            seconds = timed(lambda stack=stack: [training_step(stack, x) for _ in range(args.steps)], device)
            times[name].append(seconds / args.steps * 1e6)
    # Rounded before the ratio is taken, so the JSON's ratio follows from the JSON's own step times.
    step_us = {name: round(statistics.median(values), 1) for name, values in times.items()}
    saved_us = (step_us["custom_op"] - step_us["aten_fallback"]) / args.pairs
    return {
        "same_as_eager": checks,
        "step_us": step_us,
        "step_us_all": {name: [round(us, 1) for us in values] for name, values in times.items()},
        "ratio_custom_op_over_aten": round(step_us["custom_op"] / step_us["aten_fallback"], 3),
        "saved_us_per_dropout": round(saved_us, 2),
        "saved_ms_at_profiled_calls_per_pass": round(saved_us * PROFILED_CALLS_PER_PASS / 1e3, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=16, help="(Linear, dropout) pairs in the compiled stack")
    parser.add_argument("--width", type=int, default=64, help="features of each Linear")
    parser.add_argument("--rows", type=int, default=8, help="rows of the input")
    parser.add_argument("--p", type=float, default=0.1, help="dropout probability")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per implementation (median)")
    parser.add_argument("--device", default=None, help="cuda if there is one, else cpu")
    parser.add_argument(
        "--python-wrapper", action="store_true", help="Inductor's Python wrapper, not the recipe's C++ one"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="a check run: its JSON goes to --out only")
    args = parser.parse_args()
    if min(args.pairs, args.width, args.rows, args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--pairs, --width, --rows, --steps and --repeats must be >= 1, --warmup >= 0")
    if not 0.0 < args.p < 1.0:
        parser.error("--p must be between 0 and 1 (exclusive): 0 and 1 draw no mask")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # steady host timings; the work is tiny
    result = measure(args, device)
    print(
        f"per step of {args.pairs} dropouts: custom op {result['step_us']['custom_op']:.1f} us, "
        f"ATen fallback {result['step_us']['aten_fallback']:.1f} us "
        f"({result['ratio_custom_op_over_aten']:.2f}x); {result['saved_us_per_dropout']:.1f} us less per "
        f"dropout, {result['saved_ms_at_profiled_calls_per_pass']:.1f} ms at the profile's "
        f"{PROFILED_CALLS_PER_PASS} calls per pass",
        flush=True,
    )
    write_result(
        "dropout_host_cost",
        {
            "card": card(device),
            "device": device.type,
            "torch": torch.__version__,
            "wrapper": "python" if args.python_wrapper else "cpp",
            **{key: getattr(args, key) for key in ("pairs", "width", "rows", "p", "steps", "repeats")},
            **result,
        },
        args.out,
        record=not args.smoke,
    )


if __name__ == "__main__":
    main()
