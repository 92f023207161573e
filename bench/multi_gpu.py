"""Multi-GPU scaling of the canary-qwen-2.5b-shaped SALM through Ray Train + DeepSpeed ZeRO-2/3.

For every ZeRO stage in ``--zero-stages`` and every GPU count N in ``--gpus`` (default 1 and 2),
one Ray Train run with N workers (1 GPU each) runs the production setup of
``salm/train/loop.py`` (``deepspeed.initialize`` with our config, AdamW, warmup+cosine,
``LossModule``) over the *same global batches* (bf16):

- a global batch is M micro-batches (M = the largest N asked for), one per bucket of
  ``bench.train_batches.make_batches`` (5-40 s clips, ~30-120 target tokens); with N GPUs each
  worker takes M/N of them and accumulates gradients over them, so every run makes the same
  optimizer steps on the same data from the same initial weights (same seed);
- dropout and SpecAugment are off, so the runs differ only in how the work is laid out: the
  per-step losses must agree (the table shows the largest difference against 1 GPU);
- throughput is global audio seconds per wall second over the timed passes; scaling efficiency
  is ``throughput(N) / (N x throughput(1))`` at the same stage; peak memory is per GPU.

Run on a machine with 2+ GPUs, one ZeRO stage per call (each Ray Train run spends ~75 s before its
first step, and ZeRO-3 passes are slow: both stages do not fit one 10-minute device call)::

    PYTHONPATH=$HOME/site:$PWD python3 -m bench.multi_gpu --zero-stages 2 --out $OUT

``--tiny`` runs the tiny recipe with CPU workers (a smoke test of the whole script).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.common import card, peak_gb, recipe, timed, write_llm_dir, write_result
from bench.train_batches import make_batches
from bench.train_throughput import audio_seconds, production_engine
from salm.train.batch_device import to_device


def global_batches(model, budget_s: float, seed: int, tiny: bool, micro_per_step: int) -> list[list[dict]]:
    """Steps of ``micro_per_step`` micro-batches: step k holds bucket k of ``micro_per_step`` seeds."""
    sets = [make_batches(model, budget_s, seed + index, tiny) for index in range(micro_per_step)]
    return [list(step) for step in zip(*sets, strict=True)]


def without_dropout(cfg) -> None:
    """Dropout, LoRA dropout and SpecAugment off: the only randomness left is the seeded init."""
    encoder = cfg.model.perception.encoder
    for key in ("dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att"):
        if key in encoder:
            encoder[key] = 0.0
    cfg.model.perception.spec_augment = None
    if cfg.model.get("lora"):
        cfg.model.lora.lora_dropout = 0.0


def scaling_worker(config: dict) -> None:
    """Ray Train worker: the production DeepSpeed setup over this rank's share of every global batch."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = OmegaConf.create(config["recipe"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    micro_per_step = int(config["micro_per_step"])
    cfg.trainer.accumulate_grad_batches = micro_per_step // world
    model, engine = production_engine(cfg, device)
    steps = global_batches(model, config["budget_s"], config["seed"], config["tiny"], micro_per_step)
    share = micro_per_step // world
    mine = [step[rank * share : (rank + 1) * share] for step in steps]  # this rank's micro-batches per step
    losses: list[torch.Tensor] = []

    def one_pass() -> None:
        for micro_batches in mine:
            step_loss = torch.zeros((), device=device)
            for batch in micro_batches:
                out = engine(to_device(batch, device))
                engine.backward(out["loss"])
                engine.step()  # an optimizer step only at the accumulation boundary
                step_loss += out["loss"].detach().float()
            losses.append(step_loss)  # no .item(): no host sync inside the timed passes

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(config["warmup"]):
        one_pass()
    times = [timed(one_pass, device) for _ in range(config["repeats"])]
    seconds = sorted(times)[len(times) // 2]

    step_losses = torch.stack(losses)
    if world > 1:
        dist.all_reduce(step_losses)  # sum over ranks of per-rank sums
    step_losses = (step_losses / micro_per_step).tolist()  # mean micro-batch loss per global step
    result = {
        "rank": rank,
        "seconds_per_pass": seconds,
        "peak_mem_gb": peak_gb(device),
        "losses": step_losses,
        "audio_s_per_pass": sum(audio_seconds(step) for step in steps),
    }
    Path(config["result_dir"], f"rank{rank}.json").write_text(json.dumps(result))
    # Printed as well as written: a run cut short by a time limit still leaves its numbers in the log.
    print(
        f"rank {rank}/{world}: {seconds:.3f} s per pass, {result['audio_s_per_pass']:.0f} audio s per pass, "
        f"peak {result['peak_mem_gb']:.1f} GB, step losses {[round(x, 5) for x in step_losses]}",
        flush=True,
    )


def run_scaling(cfg, gpus: int, args, use_gpu: bool) -> list[dict]:
    """One Ray Train run with ``gpus`` workers; returns every rank's result."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    result_dir = Path(tempfile.mkdtemp())
    cpus_per_worker = 4 if use_gpu else 1
    ray.init(num_cpus=cpus_per_worker * gpus + 2, num_gpus=gpus if use_gpu else 0)
    try:
        TorchTrainer(
            scaling_worker,
            train_loop_config={
                "recipe": OmegaConf.to_container(cfg, resolve=True),
                "micro_per_step": max(args.gpus),
                "budget_s": args.budget_s,
                "seed": args.seed,
                "tiny": args.tiny,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "result_dir": str(result_dir),
            },
            scaling_config=ScalingConfig(
                num_workers=gpus,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=RunConfig(name="multi_gpu", storage_path=tempfile.mkdtemp()),
        ).fit()
    finally:
        ray.shutdown()
    return [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in range(gpus)]


def summarise(runs: dict[tuple[int, int], list[dict]]) -> dict[str, dict]:
    """Per (stage, N): throughput, peak memory per GPU, scaling efficiency and loss agreement vs N=1."""
    rows = {}
    for (stage, gpus), ranks in runs.items():
        seconds = max(r["seconds_per_pass"] for r in ranks)  # the pass ends when the slowest rank does
        throughput = ranks[0]["audio_s_per_pass"] / seconds
        rows[f"zero{stage}_gpus{gpus}"] = {
            "zero_stage": stage,
            "gpus": gpus,
            "seconds_per_pass": seconds,
            "audio_s_per_s": throughput,
            "peak_mem_gb_per_gpu": [r["peak_mem_gb"] for r in ranks],
            "losses": ranks[0]["losses"],
        }
    for row in rows.values():
        single = rows.get(f"zero{row['zero_stage']}_gpus1")
        if single is None:
            continue
        row["scaling_efficiency"] = row["audio_s_per_s"] / (row["gpus"] * single["audio_s_per_s"])
        row["max_abs_loss_diff_vs_1gpu"] = max(
            abs(a - b) for a, b in zip(row["losses"], single["losses"], strict=True)
        )
    return rows


def print_table(rows: dict[str, dict]) -> None:
    header = f"{'run':<14}{'s/pass':>9}{'audio-s/s':>11}{'scaling':>9}{'peak GB/GPU':>14}{'max |dloss|':>13}{'last loss':>11}"
    print(header)
    for name, row in rows.items():
        peak = "/".join(f"{gb:.1f}" for gb in row["peak_mem_gb_per_gpu"])
        print(
            f"{name:<14}{row['seconds_per_pass']:>9.3f}{row['audio_s_per_s']:>11.1f}"
            f"{row.get('scaling_efficiency', float('nan')):>9.1%}{peak:>14}"
            f"{row.get('max_abs_loss_diff_vs_1gpu', float('nan')):>13.2e}{row['losses'][-1]:>11.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny recipe with CPU workers: a smoke test")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts (1 must be one)")
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument(
        "--budget-s", type=float, default=160.0, help="audio seconds per micro-batch (bucket max x size)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed passes (their losses are compared too)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if 1 not in args.gpus or any(max(args.gpus) % n for n in args.gpus):
        parser.error("--gpus must include 1 and divide the largest count (e.g. 1 2 or 1 2 4)")
    if args.tiny:
        args.budget_s = min(args.budget_s, 6.0)
    use_gpu = torch.cuda.is_available() and not args.tiny
    if use_gpu and torch.cuda.device_count() < max(args.gpus):
        parser.error(f"{max(args.gpus)} GPUs asked for, {torch.cuda.device_count()} visible")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    cfg = recipe(write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=args.tiny), tiny=args.tiny)
    cfg.trainer.precision = "bf16"
    cfg.model.lr_scheduler.warmup_steps = 1  # full LR from the second step: the weights really move
    cfg.trainer.max_steps = 1000
    without_dropout(cfg)
    runs = {}
    started = time.perf_counter()
    for stage in args.zero_stages:
        cfg.deepspeed.zero_stage = stage
        for gpus in sorted(args.gpus):
            runs[(stage, gpus)] = run_scaling(cfg, gpus, args, use_gpu)
            print(f"zero{stage} x {gpus}: done at {time.perf_counter() - started:.0f} s", flush=True)
    rows = summarise(runs)
    print_table(rows)
    device = torch.device("cuda" if use_gpu else "cpu")
    write_result(
        "multi_gpu_"
        + "_".join(f"zero{stage}" for stage in args.zero_stages)
        + ("_tiny" if args.tiny else ""),
        {
            "card": card(device),
            "gpus": sorted(args.gpus),
            "micro_batches_per_step": max(args.gpus),
            "budget_s_per_micro_batch": args.budget_s,
            "runs": rows,
        },
        args.out,
        record=not args.tiny,
    )


if __name__ == "__main__":
    main()
