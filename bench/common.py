"""What both GPU benchmarks share: the Canary-Qwen-2.5B-shaped config, a timer, the bf16 matmul ceiling.

Weights are random (``pretrained_weights: false``, no ASR ``.nemo``): speed depends on shapes only,
and nothing is downloaded. The LLM directory is Qwen3-1.7B's config with the real Qwen3 tokenizer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from datetime import date
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from salm.assets.tiny_llm import write_tiny_qwen3
from salm.model.config import asr_prompt

CONFIGS = Path(__file__).resolve().parents[1] / "salm" / "configs"
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = asr_prompt()


def write_llm_dir(out_dir: Path, tiny: bool) -> Path:
    """Qwen3-1.7B's shapes (28 layers, hidden 2048, 16 Q / 8 KV heads of 128, MLP 6144, tied) or a tiny one."""
    if tiny:
        return write_tiny_qwen3(out_dir)
    return write_tiny_qwen3(
        out_dir, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144
    )


def recipe(llm_dir: Path, tiny: bool) -> DictConfig:
    """The canary-qwen-2.5b recipe (or the tiny one) with random weights and the given LLM dir."""
    cfg = OmegaConf.load(CONFIGS / ("tiny.yaml" if tiny else "salm_canary_qwen_2.5b.yaml"))
    cfg.model.pretrained_llm = str(llm_dir)
    cfg.model.pretrained_weights = False
    cfg.model.pretrained_asr = None
    return cfg


def with_canary_training_settings(cfg: DictConfig) -> DictConfig:
    """``cfg`` (e.g. the tiny recipe) trained as the canary recipe trains: its DeepSpeed stage and
    extras, bf16, gradient clipping, aligned attention keys and SpecAugment; the model's sizes stay ``cfg``'s."""
    canary = OmegaConf.load(CONFIGS / "salm_canary_qwen_2.5b.yaml")
    cfg.deepspeed.config = canary.deepspeed.config
    cfg.deepspeed.zero_stage = canary.deepspeed.zero_stage
    cfg.trainer.precision = canary.trainer.precision
    cfg.trainer.gradient_clip_val = canary.trainer.gradient_clip_val
    cfg.model.perception.pad_attention_keys_to = canary.model.perception.pad_attention_keys_to
    cfg.model.perception.spec_augment = canary.model.perception.spec_augment
    return cfg


def init_single_process_group() -> None:
    """World size 1 over gloo, as DeepSpeed needs a process group even for one rank."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of ``fn()`` with the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run_epochs(step, batches: Iterable[dict], device: torch.device, warmup: int, repeats: int) -> float:
    """Wall seconds per pass over ``batches`` (median of ``repeats``), after ``warmup`` passes."""
    for _ in range(warmup):
        for batch in batches:
            step(batch)
    times = []
    for _ in range(repeats):
        times.append(timed(lambda: [step(b) for b in batches], device))
    return sorted(times)[len(times) // 2]


def bf16_matmul_tflops(device: torch.device) -> float:
    """Measured dense bf16 matmul rate (TFLOP/s, median of 20) on random 8192^3: the MFU denominator."""
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def card(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count (``/proc/cpuinfo``) for a CPU run."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    models = [line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")]
    return f"cpu: {models[0] if models else 'unknown model'}, {os.cpu_count()} cores"


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return []


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


# The caching allocator's counters that show it struggling with new tensor sizes: cudaMalloc and
# cudaFree calls, and retries (every cached block freed, then cudaMalloc again: a device sync).
ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def allocator_counts(device: torch.device) -> dict[str, int]:
    """The allocator counters now (empty off CUDA); subtract two readings for what a stretch of work cost."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {key: int(stats.get(key, 0)) for key in ALLOCATOR_COUNTERS}


def allocator_growth(before: dict[str, int], device: torch.device, passes: int) -> dict[str, float]:
    """Allocator counters per pass since ``before``, and the memory the allocator holds now (GB)."""
    if device.type != "cuda":
        return {}
    after = allocator_counts(device)
    growth = {f"{key}_per_pass": round((after[key] - before[key]) / passes, 1) for key in ALLOCATOR_COUNTERS}
    return {**growth, "reserved_gb": round(torch.cuda.memory_reserved(device) / 2**30, 1)}


def set_pointwise_class(encoder: torch.nn.Module, cls: type) -> bool:
    """The Conformer's pointwise convolutions as ``cls``: NeMo's ``Conv1d`` (the benches' "before"
    variants) or the recipe's ``PointwiseConvAsMatmul``; same weights either way. Returns whether
    any changed class (a compiled model must then be traced again)."""
    from salm.model.pointwise_conv import PointwiseConvAsMatmul, is_pointwise

    changed = False
    for module in encoder.modules():
        if type(module) in (torch.nn.Conv1d, PointwiseConvAsMatmul) and is_pointwise(module):
            changed = changed or type(module) is not cls
            module.__class__ = cls
    return changed


def write_result(name: str, payload: dict, out_dir: Path | None, record: bool = True) -> None:
    """``bench/results/NAME.json`` (and a copy in ``out_dir``, e.g. the device machine's $OUT).

    ``record=False`` (smoke runs) writes only to ``out_dir``: a smoke test is not a result.
    """
    payload = {**payload, "date": date.today().isoformat()}
    text = json.dumps(payload, indent=2, sort_keys=True)
    for folder in ([RESULTS] if record else []) + ([out_dir] if out_dir else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(text + "\n")
    print(text)
