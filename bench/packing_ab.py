"""Packed vs padded LLM sequences in the SALM loss (``trainer.pack_llm_sequences``), one process, one GPU.

The canary-qwen-2.5b shapes with random weights in bf16, the training bench's five bucketed
batches (``bench.train_batches``, 640 audio s each by default), forward + backward of
``SALM.loss`` per batch: the model alone, eager, without Ray, DeepSpeed or an optimizer step, so
that the only difference between the two rows is the LLM call. Needs neither Ray nor DeepSpeed
(only the NeMo and transformers wheels on the GPU image). First the two losses and gradients of
one batch in eval mode (no dropout): equal up to bf16 rounding. Then one unmeasured pass of each
and four rounds, padded, packed, padded, packed, of three passes each; a round's time is its
median pass, each variant's its best round. ``--compiled`` compiles the layers first, with the
canary recipe's Inductor options (``cpp_wrapper``), as the recipe's training step runs them::

    python3 -m bench.packing_ab --out $OUT
    python3 -m bench.packing_ab --compiled --out $OUT
    python3 -m bench.packing_ab --tiny          # CPU smoke test, the tiny recipe
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import card, peak_gb, recipe, sync, write_llm_dir, write_result
from bench.train_batches import make_batches
from salm.model import SALM
from salm.model.compile import compile_repeated_layers


def build_model(tiny: bool, device: torch.device, compiled: bool = False) -> SALM:
    """The recipe's SALM with random weights (seed 0), bf16 on a GPU; ``compiled``: its repeated
    layers compiled with the recipe's ``trainer.compile_options``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = recipe(write_llm_dir(Path(tmp) / "llm", tiny=tiny), tiny=tiny)
        torch.manual_seed(0)
        with torch.device(device):
            model = SALM(cfg.model)
    # NeMo creates some parameters on the CPU whatever the default device: move everything.
    model = model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if compiled:
        compile_repeated_layers(model, cfg.trainer.get("compile_options") or {})
    return model


def reference_check(model: SALM, batch: dict) -> dict:
    """``batch``'s loss, LLM positions and gradients, padded and packed, in eval mode (no dropout):
    the losses and ``grad_relative_difference`` (the norm of the gradients' difference over the
    padded gradients' norm) say whether packing computes the same thing, here in bf16."""
    model.eval()
    result, grads = {}, {}
    for name in ("padded", "packed"):
        model.pack_llm_sequences = name == "packed"
        model.zero_grad(set_to_none=True)
        out = model.loss(batch)
        out["loss"].backward()
        grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        result[name] = {
            "loss": float(out["loss"]),
            "computed_positions": int(out["padded_positions"]),
            "real_positions": int(out["num_positions"]),
        }
    model.zero_grad(set_to_none=True)
    difference = (grads["packed"] - grads["padded"]).norm() / grads["padded"].norm()
    result["grad_relative_difference"] = float(difference)
    return result


def one_pass(model: SALM, batches: list[dict]) -> None:
    """Forward + backward of ``SALM.loss`` over every batch, gradients dropped after each."""
    for batch in batches:
        model.loss(batch)["loss"].backward()
        model.zero_grad(set_to_none=True)


def time_rounds(model: SALM, batches: list[dict], device: torch.device, rounds: int, passes: int) -> dict:
    """Per variant: each round's median pass (forward + backward over every batch) and peak memory."""
    model.train()
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    peaks: dict[str, float] = {}
    for name in times:  # unmeasured: train-mode graphs of compiled layers, allocator warm-up
        model.pack_llm_sequences = name == "packed"
        one_pass(model, batches)
    for round_index in range(rounds):
        name = "packed" if round_index % 2 else "padded"
        model.pack_llm_sequences = name == "packed"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        for _ in range(passes):
            sync(device)
            started = time.perf_counter()
            one_pass(model, batches)
            sync(device)
            seconds.append(time.perf_counter() - started)
        times[name].append(sorted(seconds)[len(seconds) // 2])
        peaks[name] = peak_gb(device)
        print(f"{name}: passes {[round(s, 3) for s in seconds]} s, peak {peaks[name]:.1f} GB", flush=True)
    return {"rounds_s": times, "peak_gb": peaks}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny recipe on CPU: a smoke test")
    parser.add_argument("--budget-s", type=float, default=None, help="audio s per batch (640; tiny: 40)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating padded/packed rounds")
    parser.add_argument("--passes", type=int, default=3, help="passes per round (its median counts)")
    parser.add_argument("--compiled", action="store_true", help="compile the layers as the recipe does")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    model = build_model(args.tiny, device, args.compiled)
    budget_s = args.budget_s or (40.0 if args.tiny else 640.0)
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(model, budget_s, 0, tiny=False)]
    check = reference_check(model, batches[0])
    print(f"first batch, eval: {json.dumps(check)}", flush=True)
    timing = time_rounds(model, batches, device, args.rounds, args.passes)
    padded, packed = min(timing["rounds_s"]["padded"]), min(timing["rounds_s"]["packed"])
    print(f"padded {padded:.3f} s per pass, packed {packed:.3f} s: {padded / packed:.2f}x", flush=True)
    write_result(
        "packing_ab" + ("_compiled" if args.compiled else "") + ("_tiny" if args.tiny else ""),
        {
            "card": card(device),
            "compiled_layers": args.compiled,
            "budget_s": budget_s,
            "padded_s_per_pass": padded,
            "packed_s_per_pass": packed,
            "speedup": padded / packed,
            "first_batch_eval": check,
            **timing,
        },
        args.out,
        record=not args.tiny,
    )


if __name__ == "__main__":
    main()
