"""What DeepSpeed's per-tensor Python costs one training step of the canary recipe, by ZeRO stage.

The canary recipe trains ~1,300 parameter tensors. DeepSpeed walks them in Python: ZeRO-2 runs a
hook per tensor in the backward (the H200 profile of the recipe's step found the GPU idle 129 ms per
five-step pass behind them), and every stage copies, flattens and unflattens them in the optimizer
step. None of that depends on the tensors' sizes, so it can be priced on the CPU: this script
builds the recipe's model with every layer kept (the same 1,310 trainable tensors) but narrow
widths, and times forward, backward and step of one small batch per ZeRO stage, one DeepSpeed
engine each, against the same model under a plain torch loop (torch's AdamW and gradient
clipping, no DeepSpeed), the paths taking turns step by step in one process.

DeepSpeed's own work is in backward + step; a stage's excess there over the torch loop is host
time the GPU waits for when the step is host-bound. The stage with less of it is the candidate
for the one-GPU recipe, to be confirmed on the GPU with ``bench/train_throughput.py
--zero-stages 1 2`` (``tests/test_zero_stages.py``: ZeRO-1 and -2 train to the same weights).

    python3 -m bench.deepspeed_host_cost --stages 0 1 2 --steps 20 --out bench/results

Single process, world size 1 (gloo), 1 CPU thread for steady timings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import RESULTS, card, init_single_process_group, recipe, write_result
from bench.train_batches import build_tokenizer_model, make_batches
from salm.assets.tiny_llm import write_tiny_qwen3

PHASES = ("forward", "backward", "step")


def narrow_recipe(llm_dir: Path, width: int, stage: int):
    """The canary recipe with every layer (hence every trainable tensor) but ``width``-wide layers.

    Encoder d_model and LLM hidden size become ``width`` (8 encoder heads, 4/2 LLM heads); LoRA's
    rank, the layer counts and the module list stay as in the recipe. Compiling and packing are
    off: they are GPU levers and change no tensor list.
    """
    cfg = recipe(llm_dir, tiny=False)
    encoder = cfg.model.perception.encoder
    encoder.d_model = width
    encoder.subsampling_conv_channels = max(8, width // 4)
    cfg.model.perception.modality_adapter.d_model = width
    cfg.model.perception.output_dim = width
    cfg.trainer.use_gpu = False
    cfg.trainer.compile_layers = False
    cfg.trainer.pack_llm_sequences = False
    cfg.deepspeed.zero_stage = stage
    return cfg


def write_narrow_qwen3(out_dir: Path, width: int) -> Path:
    """Qwen3-1.7B's 28 layers (tied embeddings, the real tokenizer) at hidden size ``width``."""
    return write_tiny_qwen3(
        out_dir, hidden_size=width, num_layers=28, num_heads=4, num_kv_heads=2, intermediate_size=2 * width
    )


class TrainingPath:
    """One path's three phases: ``forward(batch) -> loss``, ``backward(loss)``, ``step()``."""

    def __init__(self, forward, backward, step, optimizer: str, gradient_hooks: int, module) -> None:
        """``module``: the engine or model the callables belong to."""
        self.forward, self.backward, self.step = forward, backward, step
        self.optimizer, self.gradient_hooks, self.module = optimizer, gradient_hooks, module

    def timed_step(self, batch: dict) -> list[float]:
        marks = [time.perf_counter()]
        loss = self.forward(batch)
        marks.append(time.perf_counter())
        self.backward(loss)
        marks.append(time.perf_counter())
        self.step()
        marks.append(time.perf_counter())
        return [end - begin for begin, end in zip(marks, marks[1:], strict=False)]


def time_interleaved(paths: dict[str, TrainingPath], batch: dict, warmup: int, steps: int) -> dict[str, dict]:
    """Median seconds of each phase per path; the paths take turns step by step, so a drift of the
    machine's speed during the run falls on all of them alike."""
    for path in paths.values():
        for _ in range(warmup):
            path.timed_step(batch)
    samples = {name: {phase: [] for phase in PHASES} for name in paths}
    for _ in tqdm(range(steps), desc="timed steps (every path)"):
        for name, path in paths.items():
            for phase, seconds in zip(PHASES, path.timed_step(batch), strict=True):
                samples[name][phase].append(seconds)
    rows = {}
    for name, path in paths.items():
        row = {phase: statistics.median(values) for phase, values in samples[name].items()}
        row["total"] = sum(row[phase] for phase in PHASES)
        row["backward_and_step"] = row["backward"] + row["step"]
        rows[name] = {**row, "optimizer": path.optimizer, "gradient_hooks": path.gradient_hooks}
    return rows


def build(cfg):
    from salm.train.engine import build_model

    return build_model(cfg, torch.device("cpu"))


def deepspeed_path(cfg) -> TrainingPath:
    """One DeepSpeed engine of the recipe (the canary ``deepspeed.config`` extras included)."""
    from salm.train.engine import wrap_in_deepspeed

    engine, _ = wrap_in_deepspeed(cfg, build(cfg), torch.device("cpu"))
    hooks = len(getattr(engine.optimizer, "_grad_acc_hooks", []))
    return TrainingPath(
        lambda b: engine(b)["loss"],
        engine.backward,
        engine.step,
        type(engine.optimizer).__name__,
        hooks,
        engine,
    )


def torch_path(cfg) -> TrainingPath:
    """The same model, bf16 weights (fp32 mel front end, as the engine keeps it), under torch's AdamW
    (its default implementation for the device) and gradient clipping, no DeepSpeed."""
    from salm.train.deepspeed_setup import build_optimizer

    model = build(cfg).to(torch.bfloat16)
    model.perception.preprocessor.float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, float(cfg.trainer.gradient_clip_val))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return TrainingPath(
        lambda b: model.loss(b)["loss"], torch.Tensor.backward, step, type(optimizer).__name__, 0, model
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2])
    parser.add_argument("--width", type=int, default=64, help="encoder d_model and LLM hidden size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"also write the JSON here (always: {RESULTS})"
    )
    parser.add_argument("--smoke", action="store_true", help="a check that it runs: writes only to --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_single_process_group()
    with tempfile.TemporaryDirectory() as tmp:
        llm_dir = write_narrow_qwen3(Path(tmp) / "llm", args.width)
        base = narrow_recipe(llm_dir, args.width, stage=2)
        batch = make_batches(build_tokenizer_model(base), budget_s=4.0, seed=0, tiny=True)[0]
        paths = {"torch": torch_path(base)}
        tensors = sum(1 for p in paths["torch"].module.parameters() if p.requires_grad)
        print(f"trainable tensors: {tensors} (width {args.width}); batch of {len(batch['audio_lens'])} clips")
        for stage in args.stages:
            paths[f"zero{stage}"] = deepspeed_path(narrow_recipe(llm_dir, args.width, stage))
        rows = time_interleaved(paths, batch, args.warmup, args.steps)
    for name, row in rows.items():
        print_row(name, row, rows["torch"])
    write_result(
        "deepspeed_host_cost",
        {"card": card(torch.device("cpu")), "width": args.width, "trainable_tensors": tensors, "rows": rows},
        args.out,
        record=not args.smoke,
    )


def print_row(name: str, row: dict, torch_row: dict) -> None:
    """Phases in ms; DeepSpeed's own work is in backward + step (its forward runs the module as is,
    so forward differences between paths are the machine's noise)."""
    phases = "  ".join(f"{phase} {row[phase] * 1e3:6.1f}" for phase in (*PHASES, "total"))
    extra = (row["backward_and_step"] - torch_row["backward_and_step"]) * 1e3
    print(
        f"{name:>6}: {phases} ms | backward + step over torch {extra:+6.1f} ms"
        f"  ({row['optimizer']}, {row['gradient_hooks']} gradient hooks)",
        flush=True,
    )


if __name__ == "__main__":
    main()
