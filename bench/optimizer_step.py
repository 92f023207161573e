"""One AdamW step as ZeRO-1/2 run it, torch's default (``foreach``) vs its fused kernel, one run.

DeepSpeed's ZeRO-1/2 hand the wrapped torch optimizer one flat fp32 partition of every trainable
weight (838,773,760 in the canary recipe), so its step is a few elementwise passes over one huge
tensor. An H100 profile of the recipe's training step (BENCHMARKS.md, "The optimizer step") spent
24 ms of GPU time per step in the ``foreach`` kernels, where one pass over the weights and their two
moments takes ~8 ms at the card's bandwidth. This bench isolates that step: the same partition,
gradient and hyperparameters, each implementation in turn, median of ``--steps`` timed steps, and the
ratio; then the largest difference between the two implementations' weights after the timed steps.

    python3 -m bench.optimizer_step                      # the GPU, the canary recipe's count
    python3 -m bench.optimizer_step --params 50000000    # a CPU-sized check
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import card, timed, write_result

CANARY_TRAINABLE_PARAMS = 838_773_760  # SALM(canary-qwen-2.5b recipe): encoder + projection + LoRA r 128
IMPLEMENTATIONS = {"foreach": {"foreach": True}, "fused": {"fused": True}}


def flat_partition(params: int, device: torch.device, seed: int = 0) -> torch.nn.Parameter:
    """One fp32 tensor of ``params`` weights with a gradient, as ZeRO's optimizer sees them."""
    generator = torch.Generator(device).manual_seed(seed)
    weights = torch.nn.Parameter(torch.randn(params, device=device, generator=generator) * 0.02)
    weights.grad = torch.randn(params, device=device, generator=generator) * 1e-3
    return weights


def step_seconds(params: int, device: torch.device, steps: int, warmup: int) -> dict[str, dict]:
    """Per implementation: median seconds per step and the weights after the steps (for the check)."""
    runs = {}
    for name, kwargs in IMPLEMENTATIONS.items():
        weights = flat_partition(params, device)
        optimizer = torch.optim.AdamW([weights], lr=5e-4, betas=(0.9, 0.98), weight_decay=1e-3, **kwargs)
        for _ in range(warmup):  # the moments' first allocation, kernel set-up
            optimizer.step()
        seconds = [timed(optimizer.step, device) for _ in tqdm(range(steps), desc=name, leave=False)]
        runs[name] = {"seconds": statistics.median(seconds), "weights": weights.detach().clone()}
        del optimizer, weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=CANARY_TRAINABLE_PARAMS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="a check that it runs: writes only to --out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    runs = step_seconds(args.params, device, args.steps, args.warmup)
    foreach, fused = runs["foreach"], runs["fused"]
    # bytes one fused pass must move: read weight, gradient and both moments, write weight and moments
    minimum_bytes = 7 * 4 * args.params
    for name, run in runs.items():
        print(
            f"{name:>8}: {run['seconds'] * 1e3:8.2f} ms per step "
            f"({minimum_bytes / run['seconds'] / 1e9:6.0f} GB/s of the one-pass minimum)"
        )
    ratio = foreach["seconds"] / fused["seconds"]
    difference = float((foreach["weights"] - fused["weights"]).abs().max())
    print(
        f"fused is {ratio:.2f}x foreach; largest weight difference after "
        f"{args.steps + args.warmup} steps: {difference:.1e}"
    )
    write_result(
        "optimizer_step" if device.type == "cuda" else "optimizer_step_cpu",
        {
            "card": card(device),
            "params": args.params,
            "steps": args.steps,
            "foreach_ms": foreach["seconds"] * 1e3,
            "fused_ms": fused["seconds"] * 1e3,
            "ratio_fused_vs_foreach": ratio,
            "max_weight_difference": difference,
        },
        args.out,
        record=not args.smoke,
    )


if __name__ == "__main__":
    main()
