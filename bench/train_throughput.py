"""Training throughput of the full SALM at canary-qwen-2.5b shapes: ours vs NeMo's SALM vs a plain loop.

One command, three ways through the same model (same seed, same random weights) and the same
bucketed synthetic batches (5-40 s of noise, ~30-120 target tokens, about ``--budget-s`` audio
seconds per batch, as a duration-bucketing sampler makes them):

- ours: Ray Train ``TorchTrainer`` with 1 GPU worker, the model and DeepSpeed engine built by
  ``salm.train.engine`` as ``salm/train/loop.py`` builds them (the recipe's ``deepspeed_config``:
  bf16, ZeRO-2; fused AdamW; warmup+cosine; ``LossModule``), its batches pinned by the training loop's
  prefetch thread (``salm.train.batch_device.prefetch_pinned``), optionally in model variants
  (``--variants``) and DeepSpeed config variants (``--ds-variants``, each with its own engine);
- NeMo: NeMo 3.0's ``SALM.training_step`` -> backward -> AdamW step (``foreach``, as NeMo's
  ``salm.yaml``), bf16 weights;
- plain: our model in fp32 under bf16 autocast, full-vocabulary logits + cross-entropy, torch's
  default AdamW, no Ray and no DeepSpeed.

``--profile`` adds one profiled pass to every path and variant: the device's busy share of the
wall, its time by kernel kind (matmul, attention, convolution, compiled fused, copies, ...) and its
top kernels, host syncs, the top host ops, and where the device sat idle waiting for the host
(``bench/device_gaps.py``: per step phase and per launching host op).

Model FLOPs of a step are counted once per batch with ``FlopCounterMode`` on our loss (forward +
backward; the LM head at target positions only) and the same count is used for every path, so
MFU ratios equal throughput ratios. The ceiling is a bf16 matmul measured in the same run.
A baseline that runs out of memory at ``--budget-s`` is reported as not fitting (ours may fit).
Tokens are LLM positions (audio frames + text). Every row also reports the caching allocator's
``cudaMalloc``/``cudaFree``/retry counts per pass and the memory it holds. The official command, on
the GPU machine (BENCHMARKS.md)::

    source bench/device_setup.sh; python3 -m bench.train_throughput --budget-s 640 --variants compiled --fresh-lengths --out $OUT

Without ``--fresh-lengths`` the five batches repeat at every pass, so a cost paid once per new input
shape (cuDNN's plans, a recompile) is paid in the warm-up and never timed; with it every path meets
a frame count it has not met at every step, as a bucketed training run does (``FreshLengths``).

DeepSpeed variants run one engine after another in one worker. On an H100 the first engine of the
process ran ~1% slower per pass than the next (estimated from two runs), so compare two engines in
both orders (BENCHMARKS.md, "Gradient reduction on one rank").

``--tiny`` runs the tiny recipe on CPU (a smoke test of all three paths).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import record_function

from bench.common import (
    allocator_counts,
    allocator_growth,
    bf16_matmul_tflops,
    card,
    peak_gb,
    recipe,
    run_epochs,
    set_pointwise_class,
    timed,
    write_llm_dir,
    write_result,
)
from bench.device_gaps import PHASES, gap_table, idle_gaps, idle_summary
from bench.train_batches import SAMPLE_RATE, build_tokenizer_model, make_batches
from salm.model.compile import (
    compile_layers,
    compile_repeated_layers,
    encoder_layers,
    llm_layers,
    repeated_layers,
)
from salm.train.batch_device import prefetch_pinned, to_device, with_layouts
from salm.train.grad_norm import use_deepspeed_gradient_clipping
from salm.train.single_rank_reduction import use_deepspeed_reduction
from salm.train.worker_errors import sendable_errors


def audio_seconds(batches: list[dict]) -> float:
    return sum(float(b["audio_lens"].sum()) for b in batches) / SAMPLE_RATE


# ----- ours: Ray Train + DeepSpeed -----
# Run in this order: compiling is in place. "compiled_pageable" feeds the compiled model pageable batches
# (the training loop before salm.train.batch_device.prefetch_pinned). "compiled_fresh_lengths" feeds the
# compiled model batches whose longest clips are one encoder frame shorter at every pass (FreshLengths):
# frame counts it has never met, as bucketed training brings them; against "compiled", what new shapes cost.
# "compiled_fresh_lengths_conv_subsampling" is that with the subsampling's stem and pointwise convolutions
# as NeMo's cuDNN Conv2d (the recipe before salm.model.subsampling_convs; eager, so nothing is traced again).
# "compiled_fresh_lengths_device_layout" is "compiled_fresh_lengths" with batches that carry no host-side
# layout (salm.model.batch_layout): the forward finds its gather indices on the device, 4 host syncs per step.
# "compiled_fresh_lengths_bool_mask_gathers" is that with the loss's packed-row and target gathers by
# boolean mask and NeMo's all-reduce of the frame count (the step before bench/host_syncs.py's change:
# 5 more host syncs per step in the forward, 2 in the backward; eager code, nothing traced again).
# "compiled_fresh_lengths_nemo_normalize" is "compiled_fresh_lengths" with the mel features normalised by
# NeMo's normalize_batch, whose .item() check waits for the GPU once per step (the front end before
# salm.model.feature_normalization; eager, nothing traced again).
# "compiled_fresh_lengths_conv_depthwise" is "compiled_fresh_lengths" with the Conformer's depthwise
# convolutions as NeMo's cuDNN Conv1d (the recipe before salm.model.depthwise_conv): it traces every layer again.
# "compiled_fresh_lengths_expandable" is "compiled_fresh_lengths" after the allocator's cache is emptied and
# switched to expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True); it stays on after it.
# "compiled_conv_pointwise" runs the Conformer's pointwise convolutions as NeMo's Conv1d (the recipe
# before salm.model.pointwise_conv): it traces every layer again.
# "checkpointed" is "default" with trainer.activation_checkpointing: true (every repeated layer, eager).
# "compiled_checkpointed_llm" and "compiled_checkpointed" add trainer.activation_checkpointing: llm, then
# true, to the compiled model (it stays on for the variants after them).
# "packed" and "compiled_packed" are "default" and "compiled" with trainer.pack_llm_sequences: true
# (the others take the recipe's setting, so with it on in the recipe they are the same).
MODEL_VARIANTS = [
    "default",
    "packed",
    "encoder_sdpa",
    "checkpointed",
    "compiled",
    "compiled_packed",
    "compiled_pageable",
    "compiled_fresh_lengths",
    "compiled_fresh_lengths_conv_subsampling",
    "compiled_fresh_lengths_device_layout",
    "compiled_fresh_lengths_bool_mask_gathers",
    "compiled_fresh_lengths_nemo_normalize",
    "compiled_fresh_lengths_conv_depthwise",
    "compiled_fresh_lengths_expandable",
    "compiled_conv_pointwise",
    "compiled_checkpointed_llm",
    "compiled_checkpointed",
]
DEVICE_LAYOUT_VARIANTS = ("compiled_fresh_lengths_device_layout", "compiled_fresh_lengths_bool_mask_gathers")
RECIPE_VARIANTS = ("default", "compiled")  # the canary recipe's step, eager or compiled layers
PACKED_VARIANTS = ("packed", "compiled_packed")
# The parts each checkpointing variant checkpoints (salm.model.activation_checkpointing.PARTS).
CHECKPOINTED_PARTS = {
    "checkpointed": ("encoder", "llm"),
    "compiled_checkpointed_llm": ("llm",),
    "compiled_checkpointed": ("encoder", "llm"),
}


class PrefetchedBatches:
    """The batches as ``salm/train/loop.py`` feeds them: every pass through ``prefetch_pinned``'s thread,
    with their host-side layout planned there when ``layout_model`` is set (our path; None for the
    baselines and the device-layout variants)."""

    def __init__(self, batches: list[dict], device: torch.device, layout_model=None) -> None:
        self.batches, self.device, self.layout_model = batches, device, layout_model

    def laid_out(self, batches: Iterable[dict]) -> Iterable[dict]:
        return batches if self.layout_model is None else with_layouts(batches, self.layout_model)

    def __iter__(self) -> Iterator[dict]:
        return prefetch_pinned(self.laid_out(self.batches), self.device)


# Samples per encoder frame: 10 ms mel hop x 8x subsampling at 16 kHz.
SAMPLES_PER_ENCODER_FRAME = 1280


class FreshLengths(PrefetchedBatches):
    """``PrefetchedBatches``, but each pass cuts every batch's longest clips by one more encoder frame
    (80 ms): each pass brings frame counts the step has never met, as bucketed training does at
    nearly every step, while the repeated batches let every per-shape cost (cuDNN plans, recompiles)
    be paid once in the warm-up. Same clips and nearly the same FLOPs."""

    def __init__(self, batches: list[dict], device: torch.device, layout_model=None) -> None:
        super().__init__(batches, device, layout_model)
        self.passes = 0

    def __iter__(self) -> Iterator[dict]:
        self.passes += 1
        cut = self.passes * SAMPLES_PER_ENCODER_FRAME
        # a generator: the prefetch thread cuts each batch, as a data loader's collate would
        return prefetch_pinned(self.laid_out(shortened(batch, cut) for batch in self.batches), self.device)


def shortened(batch: dict, cut: int) -> dict:
    """``batch`` with its padded audio ``cut`` samples shorter and the clips that reached past it trimmed."""
    keep = batch["audios"].shape[1] - cut
    if keep < SAMPLES_PER_ENCODER_FRAME:
        raise ValueError(f"cannot cut {cut} samples off a batch of {batch['audios'].shape[1]}-sample clips")
    return {
        **batch,
        "audios": batch["audios"][:, :keep].contiguous(),
        "audio_lens": batch["audio_lens"].clamp(max=keep),
    }


def set_encoder_sdpa(model, enabled: bool) -> None:
    """NeMo's Conformer attention reads ``use_pytorch_sdpa`` at every forward: toggle it per variant."""
    for layer in model.perception.encoder.layers:
        layer.self_attn.use_pytorch_sdpa = enabled


def set_compiled_levers(model, variant: str) -> bool:
    """The recipe's matmul pointwise convolutions and shifted-sum depthwise convolutions (what
    ``compile_layers`` sets), or NeMo's for their "before" variants; returns whether a module changed
    (Dynamo must then trace the layers again)."""
    from torch import nn

    from salm.model.depthwise_conv import use_shifted_sum_depthwise_convs
    from salm.model.pointwise_conv import PointwiseConvAsMatmul
    from salm.model.subsampling_convs import use_matmul_subsampling_convs

    use_matmul_subsampling_convs(  # eager, outside the compiled layers: no retrace either way
        model.perception.encoder, enabled=variant != "compiled_fresh_lengths_conv_subsampling"
    )
    pointwise = nn.Conv1d if variant == "compiled_conv_pointwise" else PointwiseConvAsMatmul
    changed = set_pointwise_class(model.perception.encoder, pointwise)
    shifted = variant != "compiled_fresh_lengths_conv_depthwise"
    changed |= use_shifted_sum_depthwise_convs(model.perception.encoder, enabled=shifted) > 0
    return changed


def set_bool_mask_gathers(model, enabled: bool) -> None:
    """The loss's gathers by boolean mask and NeMo's per-batch all-reduce of the frame count (the step
    before ``bench/host_syncs.py``'s change), or the model's own integer-index gathers without it."""
    import salm.model.salm as salm_module
    from salm.model import packing, placeholders

    salm_module.pack_sequences = pack_sequences_by_mask if enabled else packing.pack_sequences
    salm_module.gather_target_positions = (
        gather_target_positions_by_mask if enabled else placeholders.gather_target_positions
    )
    model.perception.encoder.sync_max_audio_length = enabled


def set_nemo_feature_normalization(model, enabled: bool) -> None:
    """The mel features normalised inside NeMo's featurizer (``normalize_batch``, one ``.item()`` per
    batch on a GPU), or by the model itself (``salm.model.feature_normalization``), the recipe's."""
    perception = model.perception
    if not (
        perception.normalizes_per_feature or perception.preprocessor.featurizer.normalize == "per_feature"
    ):
        if enabled:
            raise ValueError("this model's front end does not normalise per feature: nothing to compare")
        return
    perception.preprocessor.featurizer.normalize = "per_feature" if enabled else None
    perception.normalizes_per_feature = not enabled


def pack_sequences_by_mask(
    input_embeds: torch.Tensor, attention_mask: torch.Tensor, target_ids: torch.Tensor, real_positions=None
):
    """``salm.model.packing.pack_sequences`` as it gathered before: three boolean masks (three syncs),
    the embeddings' backward syncing again. The variant feeds no layout (``real_positions`` unused)."""
    from salm.model.packing import PackedSequences

    real = attention_mask.bool()
    cu_seq_lens = torch.nn.functional.pad(real.sum(dim=1).cumsum(dim=0), (1, 0)).to(torch.int32)
    return PackedSequences(
        embeds=input_embeds[real].unsqueeze(0),
        targets=target_ids[real].unsqueeze(0),
        position_ids=((real.cumsum(dim=1) - 1)[real]).unsqueeze(0),
        cu_seq_lens=cu_seq_lens,
        max_length=attention_mask.shape[1],
    )


def gather_target_positions_by_mask(hidden: torch.Tensor, targets: torch.Tensor, positions=None):
    """``salm.model.placeholders.gather_target_positions`` as the loss gathered before (two boolean masks;
    ``positions`` unused)."""
    from salm.model.placeholders import IGNORE_INDEX

    is_target = targets != IGNORE_INDEX
    return hidden[is_target], targets[is_target]


def layers_of(model, parts: tuple[str, ...]) -> list:
    """The repeated layers of ``parts`` ("encoder", "llm"), as ``trainer.activation_checkpointing`` names them."""
    return [layer for part in parts for layer in {"encoder": encoder_layers, "llm": llm_layers}[part](model)]


def set_eager_checkpointing(model, variant: str) -> None:
    """Every repeated layer of the eager model checkpointed for "checkpointed", none for the other variants."""
    from salm.model.activation_checkpointing import checkpoint_layers, is_checkpointed

    for layer in repeated_layers(model):
        if is_checkpointed(layer):
            del layer.forward  # back to the class's forward
    checkpoint_layers(layers_of(model, CHECKPOINTED_PARTS.get(variant, ())))


def checkpoint_compiled_layers(model, inductor_options, parts: tuple[str, ...]) -> None:
    """Activation checkpointing on the layers of ``parts`` of a compiled model, compiled again after it, in
    the training loop's order (``salm.model.activation_checkpointing``); the next passes compile."""
    from salm.model.activation_checkpointing import checkpoint_layers, is_checkpointed

    layers = [layer for layer in layers_of(model, parts) if not is_checkpointed(layer)]
    for layer in layers:
        layer._compiled_call_impl = None  # checkpoint_layers refuses compiled layers
    checkpoint_layers(layers)
    compile_layers(layers, inductor_options)


def production_engine(cfg, device: torch.device):
    """Our SALM on ``device`` wrapped exactly as ``salm/train/loop.py`` wraps it: (model, engine), train mode."""
    from salm.train.engine import build_model, wrap_in_deepspeed

    model = build_model(cfg, device)
    engine, _ = wrap_in_deepspeed(cfg, model, device)
    return model, engine


# DeepSpeed config variants: each replaces the recipe's `deepspeed.config` and gets its own engine.
# "recipe" keeps what the recipe says; "deepspeed_grad_norm" is the recipe with DeepSpeed's own
# per-tensor gradient norm loop put back; the others isolate the settings the recipe chose: DeepSpeed's
# own defaults, then without the throughput timer's 2 device syncs per step, then also without the bf16
# overflow scan (a `.item()` plus ~6 kernels per gradient tensor) and the contiguous gradient buffer.
DS_VARIANTS: dict[str, dict | None] = {
    "recipe": None,
    "deepspeed_grad_norm": None,  # the recipe, with DeepSpeed's per-tensor gradient norm (salm.train.grad_norm)
    "foreach_adamw": None,  # the recipe, with torch's default AdamW (foreach) instead of its fused one
    "deepspeed_reduction": None,  # the recipe, with DeepSpeed's bucket all-reduce on one rank (salm.train.single_rank_reduction)
    "deepspeed_defaults": {},
    "no_timers": {"timers": {"throughput": {"enabled": False}}},
    "lean": {
        "timers": {"throughput": {"enabled": False}},
        "bf16": {"check_grad_overflow": False},
        "zero_optimization": {"contiguous_gradients": False},
    },
}


def profile_pass(step, batches: Iterable[dict], device: torch.device) -> dict:
    """One pass under ``torch.profiler``: the device's busy share of the wall and the top host ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall_s = timed(lambda: [step(b) for b in batches], device)
    averages = prof.key_averages()
    # Kernel events only (as the table's "Self CUDA time total"): op events repeat their kernels' time,
    # and so do user annotations on the device ("Optimizer.step#AdamW.step").
    kernels = {
        e.key: e
        for e in averages
        if e.device_type == DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and "#" not in e.key
    }
    device_s = sum(e.self_device_time_total for e in kernels.values()) / 1e6
    table = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    print(table, flush=True)
    print(kernel_table(kernels, device_s), flush=True)
    gaps = idle_gaps(prof.events()) if device.type == "cuda" else []
    print(gap_table(gaps, wall_s), flush=True)
    syncs = sum(e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx"))
    return {
        "wall_s": round(wall_s, 3),
        "device_busy_s": round(device_s, 3),
        "device_s_by_kind": kernel_seconds_by_kind(kernels),
        "device_busy_fraction": round(device_s / wall_s, 3),
        "device_idle_s_by_phase": idle_summary(gaps),
        "host_syncs": syncs,
        "kernel_launches": launches,
        "top_host_ops": table,
    }


# Kernel name fragments -> what the GPU was doing (first match wins); the rest is "other".
KERNEL_KINDS = [
    ("attention", ("fmha", "flash", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm100_")),
    ("convolution", ("conv", "cudnn", "implicit", "depthwise", "winograd")),
    ("compiled fused (triton)", ("triton_",)),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("norm / reduce", ("norm", "reduce", "batch_norm", "softmax")),
    ("copy / cast", ("copy", "memcpy", "memset", "cast", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def kernel_seconds_by_kind(kernels: dict) -> dict[str, float]:
    """GPU seconds per kernel kind in one profiled pass: where the device time goes."""
    totals: dict[str, float] = {}
    for name, event in kernels.items():
        kind = kernel_kind(name)
        totals[kind] = totals.get(kind, 0.0) + event.self_device_time_total / 1e6
    return {kind: round(seconds, 4) for kind, seconds in sorted(totals.items(), key=lambda kv: -kv[1])}


def kernel_table(kernels: dict, device_s: float, rows: int = 30) -> str:
    """The GPU's time per kind, then its ``rows`` most expensive kernels, as aligned text."""
    lines = [f"{'GPU time by kind':<40}{'s':>8}{'share':>8}"]
    for kind, seconds in kernel_seconds_by_kind(kernels).items():
        lines.append(f"{kind:<40}{seconds:>8.3f}{seconds / max(device_s, 1e-9):>8.1%}")
    lines.append(f"\n{'top kernels':<90}{'calls':>7}{'ms':>9}{'us/call':>9}  kind")
    top = sorted(kernels.values(), key=lambda e: -e.self_device_time_total)[:rows]
    for event in top:
        ms = event.self_device_time_total / 1e3
        lines.append(
            f"{event.key[:88]:<90}{event.count:>7}{ms:>9.1f}{1e3 * ms / max(event.count, 1):>9.1f}  {kernel_kind(event.key)}"
        )
    return "\n".join(lines)


def time_ds_variant(cfg, device: torch.device, config: dict, ds_variant: str) -> dict:
    """Build the production engine with ``ds_variant``'s DeepSpeed config; time (and profile) each model variant."""
    # Memory an earlier engine of this process still holds (+14.1 GB per earlier engine at the canary
    # shape on an H100: likely the compiled layers' code cache keeping its model and optimizer alive).
    # Left out of this engine's peak.
    held_gb = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if DS_VARIANTS[ds_variant] is not None:
        cfg.deepspeed.config = DS_VARIANTS[ds_variant]
    if ds_variant == "foreach_adamw":
        cfg.model.optimizer.fused = False
    model, engine = production_engine(cfg, device)
    if ds_variant == "deepspeed_grad_norm":
        use_deepspeed_gradient_clipping(engine.optimizer)
    if ds_variant == "deepspeed_reduction":
        use_deepspeed_reduction(engine.optimizer)
    batches = make_batches(model, config["budget_s"], config["seed"], config["tiny"])
    prefetched = (FreshLengths if config["fresh_lengths"] else PrefetchedBatches)(batches, device, model)

    def step(batch: dict) -> None:
        with record_function(PHASES[0]):
            out = engine(to_device(batch, device))
        with record_function(PHASES[1]):
            engine.backward(out["loss"])
        with record_function(PHASES[2]):
            engine.step()

    results = {}
    compiled = False
    fresh = None  # the compiled_fresh_lengths variants' one feed: a later one goes on cutting, never repeats
    recipe_packs = cfg.trainer.get("pack_llm_sequences", False)
    for variant in config["variants"]:
        name = variant if ds_variant == "recipe" else f"{variant},ds={ds_variant}"
        try:
            set_encoder_sdpa(model, variant == "encoder_sdpa")
            set_bool_mask_gathers(model, variant == "compiled_fresh_lengths_bool_mask_gathers")
            set_nemo_feature_normalization(model, variant == "compiled_fresh_lengths_nemo_normalize")
            model.pack_llm_sequences = variant in PACKED_VARIANTS or recipe_packs  # the recipe's, or packed
            # levers changed on compiled layers are traced again; the first compile sets them below
            retraced = compiled and variant.startswith("compiled") and set_compiled_levers(model, variant)
            if retraced:
                from torch._dynamo import reset  # here, not at the top: see the counters' import below

                reset()  # every layer is traced again in this variant's first pass
            if not compiled:
                set_eager_checkpointing(model, variant)
            elif variant in CHECKPOINTED_PARTS:
                checkpoint_compiled_layers(model, cfg.trainer.compile_options, CHECKPOINTED_PARTS[variant])
                retraced = True
            if variant == "compiled_pageable":
                feed = list(with_layouts(batches, model))  # planned ahead, as the prefetching feeds do
            elif variant.startswith("compiled_fresh_lengths"):
                feed = fresh = fresh or FreshLengths(batches, device)
                feed.layout_model = None if variant in DEVICE_LAYOUT_VARIANTS else model
            else:
                feed = prefetched
            compile_s = None
            # In place, hence last; its first pass compiles.
            if variant.startswith("compiled") and not compiled:
                compile_repeated_layers(model, cfg.trainer.compile_options)  # the recipe's Inductor options
                set_compiled_levers(model, variant)  # after compiling, which sets the recipe's; traced lazily
                compiled = True
                compile_s = timed(lambda feed=feed: [step(b) for b in feed], device)
                print(f"ours[{name}]: first pass (compiling) {compile_s:.1f} s", flush=True)
                # Dynamo's counts (imported here: a function of `python -m`'s __main__ reaches the Ray
                # worker pickled by value, with copies of its globals): one graph per layer type, no breaks.
                from torch._dynamo.utils import counters

                graphs = {
                    "graph_breaks": sum(counters["graph_break"].values()),
                    "graphs": counters["stats"]["unique_graphs"],
                    "frames": counters["frames"]["ok"],
                }
                print(f"ours[{name}]: {json.dumps(graphs)}", flush=True)
            elif retraced:  # its own compiling pass, timed apart as the first compiled variant's is
                compile_s = timed(lambda feed=feed: [step(b) for b in feed], device)
                print(f"ours[{name}]: first pass (compiling again) {compile_s:.1f} s", flush=True)
            if variant == "compiled_fresh_lengths_expandable" and device.type == "cuda":
                # cached blocks back to the driver; from here on the allocator grows segments in place
                torch.cuda.empty_cache()
                torch._C._accelerator_setAllocatorSettings("expandable_segments:True")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = allocator_counts(device)
            seconds = run_epochs(step, feed, device, config["warmup"], config["repeats"])
            peak = peak_gb(device) - held_gb
            results[name] = {"seconds": seconds, "peak_mem_gb": peak, "compile_pass_s": compile_s}
            results[name]["allocator"] = allocator_growth(
                before, device, config["warmup"] + config["repeats"]
            )
            if compile_s is not None:
                results[name].update(graphs)
            if compiled:  # graphs compiled so far: one that grows in a later variant recompiled there
                from torch._dynamo.utils import counters

                results[name]["graphs_so_far"] = counters["stats"]["unique_graphs"]
            print(
                f"ours[{name}]: {seconds:.3f} s per pass; allocator {results[name]['allocator']}", flush=True
            )
            if config["profile"]:
                profiled = profile_pass(step, feed, device)
                results[name]["profile"] = profiled
                summary = {k: v for k, v in profiled.items() if k != "top_host_ops"}
                print(f"ours[{name}] profiled: {json.dumps(summary)}", flush=True)
                # which lines the profile's syncs come from (cuDNN's, NCCL's: not named)
                if device.type == "cuda":
                    from bench.host_syncs import device_sync_sites

                    results[name]["device_sync_sites"] = sites = device_sync_sites(step, feed, device)
                    print(
                        f"ours[{name}] syncs torch reports, one pass: {json.dumps(sites, indent=1)}",
                        flush=True,
                    )
        except Exception:  # noqa: BLE001 - one variant's failure must not lose the others' timings
            # As text: Ray Train cannot send back an exception that holds a process group and then
            # reports only that serialisation error (seen with a compiled variant on the GPU).
            error = traceback.format_exc()
            print(f"ours[{name}] failed:\n{error}", flush=True)
            results[name] = {"error": error}
    return results


@sendable_errors
def ours_worker(config: dict) -> None:
    """Ray Train worker: per DeepSpeed variant the production setup, then timed passes per model variant."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = {}
    for ds_variant in config["ds_variants"]:
        results.update(time_ds_variant(OmegaConf.create(config["recipe"]), device, config, ds_variant))
        gc.collect()  # the previous engine's memory back before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    Path(config["result_file"]).write_text(json.dumps(results))


def run_ours(cfg, args, use_gpu: bool) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    result_file = Path(tempfile.mkdtemp()) / "ours.json"
    ray.init(num_cpus=8 if use_gpu else 2, num_gpus=1 if use_gpu else 0)
    try:
        trainer = TorchTrainer(
            ours_worker,
            train_loop_config={
                "recipe": OmegaConf.to_container(cfg, resolve=True),
                "budget_s": args.budget_s,
                "seed": args.seed,
                "tiny": args.tiny,
                "variants": args.variants,
                "ds_variants": args.ds_variants,
                "profile": args.profile,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "fresh_lengths": args.fresh_lengths,
                "result_file": str(result_file),
            },
            scaling_config=ScalingConfig(
                num_workers=1,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": 4 if use_gpu else 1, **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=RunConfig(name="train_throughput", storage_path=tempfile.mkdtemp()),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    return json.loads(result_file.read_text())


# ----- plain PyTorch and model FLOPs -----
def batch_rows(batch: dict, rows: list[int]) -> dict:
    """The clips ``rows`` of a collated batch, every tensor keeping its padded width."""
    return {key: value[rows] for key, value in batch.items()}


def count_flops(model, batch: dict, autocast) -> tuple[int, int]:
    """(model FLOPs of our loss's forward + backward, real LLM positions) of one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with autocast:
            out = model.loss(batch)
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops(), int(out["num_positions"])


def count_in_parts(model, batch: dict, parts: int, autocast) -> tuple[int, int]:
    """``count_flops`` summed over ``parts`` slices of the batch's clips: the same numbers with
    about 1/parts of the activation memory (a 1280 audio s batch of the canary shape does not fit
    an H200 in one eager forward + backward).

    Exact because every FLOP of a step belongs to one clip at the batch's padded widths. The
    widths are set by two clips, the longest audio and the longest LLM sequence (text plus audio
    frames): these anchors join every part, and their own count is taken off all but once. The
    shortest LLM sequence is an anchor too, so that no count runs without padding: without it
    transformers drops the mask and asks SDPA for grouped-query attention, which torch 2.11's
    FLOP counter refuses ("query/key/value shapes are incompatible").
    """
    if parts <= 1:
        return count_flops(model, batch, autocast)
    clips = batch["audio_lens"].shape[0]
    with torch.no_grad(), autocast:
        llm_lengths = model.prepare_inputs(batch)["attention_mask"].sum(dim=1)
    anchors = sorted(
        {int(llm_lengths.argmax()), int(batch["audio_lens"].argmax()), int(llm_lengths.argmin())}
    )
    others = [i for i in range(clips) if i not in anchors]
    slices = [others[i::parts] for i in range(min(parts, len(others)))]
    if len(slices) < 2:
        return count_flops(model, batch, autocast)
    counted = [count_flops(model, batch_rows(batch, sorted([*rows, *anchors])), autocast) for rows in slices]
    anchor_flops, anchor_positions = count_flops(model, batch_rows(batch, anchors), autocast)
    extra = len(slices) - 1
    return (
        sum(f for f, _ in counted) - extra * anchor_flops,
        sum(p for _, p in counted) - extra * anchor_positions,
    )


def full_vocab_loss(model, batch: dict, autocast) -> torch.Tensor:
    """The plain loop's loss: our SALM's logits over the full vocabulary under ``autocast``, then
    cross-entropy at the target positions (no Ray, no DeepSpeed, no loss tricks)."""
    from salm.model.placeholders import IGNORE_INDEX

    with autocast:
        inputs = model.prepare_inputs(batch)
        logits = model(inputs["input_embeds"], inputs["attention_mask"])  # (B, T, V): full vocabulary
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), inputs["target_ids"].flatten(), ignore_index=IGNORE_INDEX
    )


def run_plain(
    cfg, batches: list[dict], feed: Iterable[dict], device: torch.device, args, time_it: bool = True
) -> tuple[dict | None, list[dict], dict]:
    """Count model FLOPs and positions per batch of ``batches`` with our loss, then time the plain
    loop over ``feed`` (unless ``time_it`` is false: ``--skip plain`` still needs the counts and
    NeMo's starting weights).

    Returns (plain timing or None, per-batch counts, our model's state dict on CPU for NeMo).
    """
    from salm.train.engine import build_model

    model = build_model(cfg, device)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    counts = []
    for batch in batches:
        flops, positions = count_in_parts(model, to_device(batch, device), args.flop_parts, autocast)
        counts.append({"flops": flops, "positions": positions})

    def plain_loss(batch: dict) -> torch.Tensor:
        return full_vocab_loss(model, to_device(batch, device), autocast)

    result = (
        time_eager_path("plain", plain_loss, model.trainable_parameters(), cfg, feed, device, args)
        if time_it
        else None
    )
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return result, counts, state


# ----- NeMo's SALM -----
def run_nemo(cfg, feed: Iterable[dict], device: torch.device, state: dict, args) -> dict:
    """NeMo 3.0's own SALM with our weights: ``training_step`` -> backward -> AdamW, bf16 weights."""
    from nemo.collections.speechlm2 import SALM as NeMoSALM

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if not model_cfg["perception"].get("output_dim"):
        from transformers import AutoConfig

        model_cfg["perception"]["output_dim"] = AutoConfig.from_pretrained(
            cfg.model.pretrained_llm
        ).hidden_size
    with torch.device(device):
        nemo = NeMoSALM(model_cfg)
    nemo.load_state_dict(state, strict=True)
    del state
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    nemo.to(device=device, dtype=dtype)
    nemo.perception.preprocessor.float()  # as in our path: the mel front end stays fp32
    nemo.train()

    def nemo_loss(batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return nemo.training_step(to_device(batch, device), 0)["loss"]

    trainable = [p for p in nemo.parameters() if p.requires_grad]
    return time_eager_path("nemo", nemo_loss, trainable, cfg, feed, device, args)


def time_eager_path(
    name: str, loss_fn, params: list, cfg, batches: Iterable[dict], device: torch.device, args
) -> dict:
    """Seconds per pass (and peak memory) of ``loss_fn(batch).backward()`` + a plain AdamW step."""
    opt = cfg.model.optimizer
    optimizer = torch.optim.AdamW(
        params, lr=float(opt.lr), betas=tuple(opt.betas), weight_decay=float(opt.weight_decay)
    )

    def step(batch: dict) -> None:
        with record_function(PHASES[0]):
            loss = loss_fn(batch)
        with record_function(PHASES[1]):
            loss.backward()
        with record_function(PHASES[2]):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = allocator_counts(device)
    try:
        seconds = run_epochs(step, batches, device, args.warmup, args.repeats)
    except torch.OutOfMemoryError as error:
        # A baseline that does not fit this batch is a result too (ours may fit it): keep the run going.
        print(
            f"{name}: out of memory at --budget-s {args.budget_s:g}: {str(error).splitlines()[0]}", flush=True
        )
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        torch.cuda.empty_cache()
        return {"out_of_memory": True, "peak_mem_gb": peak_gb(device)}
    allocator = allocator_growth(before, device, args.warmup + args.repeats)
    print(f"{name}: {seconds:.3f} s per pass; allocator {allocator}", flush=True)
    result = {"seconds": seconds, "peak_mem_gb": peak_gb(device), "allocator": allocator}
    if args.profile:
        result["profile"] = profile_pass(step, batches, device)
        summary = {k: v for k, v in result["profile"].items() if k != "top_host_ops"}
        print(f"{name} profiled: {json.dumps(summary)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny recipe on CPU: a smoke test")
    parser.add_argument(
        "--budget-s", type=float, default=320.0, help="audio seconds per batch (bucket max x size)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes over the buckets")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (median)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        choices=MODEL_VARIANTS,
        help="model variants, timed one after the other on one engine (compiled: salm.model.compile)",
    )
    parser.add_argument(
        "--ds-variants", nargs="+", default=["recipe"], choices=list(DS_VARIANTS), help="DeepSpeed configs"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile one pass of each path and variant"
    )
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[2], help="one Ray Train run per stage")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ours", "plain", "nemo"])
    parser.add_argument(
        "--flop-parts",
        type=int,
        default=1,
        help="count each batch's model FLOPs in this many slices of its clips (same count, less "
        "memory: 2 for --budget-s 1280 on a 141 GB card)",
    )
    parser.add_argument(
        "--flops-from",
        type=Path,
        default=None,
        help="with --skip plain nemo: reuse the per-batch FLOP counts of an earlier run's JSON of the same "
        "batches (e.g. bench/results/train_throughput.json) instead of building the fp32 model to count "
        "them (about a minute of GPU time); refused when its batches differ",
    )
    parser.add_argument(
        "--fresh-lengths",
        action="store_true",
        help="feed every path and variant a frame count it has not met at every step, as bucketed "
        "training does (FreshLengths: each pass one encoder frame shorter); model FLOPs stay those "
        "of the uncut batches (a few 80 ms frames more than run)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.fresh_lengths and any(v.startswith("compiled_fresh_lengths") for v in args.variants):
        parser.error(
            "--fresh-lengths feeds every variant new lengths: leave out the compiled_fresh_lengths variants"
        )
    if args.tiny:
        args.budget_s = min(args.budget_s, 6.0)
    args.variants = sorted(set(args.variants), key=MODEL_VARIANTS.index)

    use_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if use_gpu else "cpu")
    llm_dir = write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=args.tiny)
    cfg = recipe(llm_dir, tiny=args.tiny)
    cfg.trainer.compile_layers = False  # the "compiled" variant compiles; default and plain stay eager
    if args.tiny:
        cfg.trainer.precision = "bf16"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    peak_tflops = bf16_matmul_tflops(device)
    print(f"card: {card(device)}; bf16 matmul: {peak_tflops:.0f} TFLOP/s", flush=True)

    batches = make_batches(build_tokenizer_model(cfg), args.budget_s, args.seed, args.tiny)
    counts_from = args.flops_from if {"plain", "nemo"} <= set(args.skip) else None
    # checked before anything trains: a run on other batches would otherwise lose its timings at the end
    counts = reused_counts(counts_from, batches) if counts_from is not None else None
    paths: dict[str, dict] = {}
    if "ours" not in args.skip:
        started = time.perf_counter()
        for stage in args.zero_stages:
            staged = copy.deepcopy(cfg)
            staged.deepspeed.zero_stage = stage
            for variant, timing in run_ours(staged, args, use_gpu).items():
                paths[f"ours[zero{stage},{variant}]" if len(args.zero_stages) > 1 else f"ours[{variant}]"] = (
                    timing
                )
        print(f"ours took {time.perf_counter() - started:.0f} s end to end", flush=True)
    # One feed for both baselines: their passes take turns along one sequence of cuts, so NeMo does
    # not meet the frame counts the plain loop already showed cuDNN in this process.
    feed = FreshLengths(batches, device) if args.fresh_lengths else batches
    if counts is not None:
        print(f"model FLOPs per batch reused from {args.flops_from} (same batches)", flush=True)
    else:
        plain, counts, state = run_plain(cfg, batches, feed, device, args, time_it="plain" not in args.skip)
        if plain is not None:
            paths["plain"] = plain
    gc.collect()
    if use_gpu:
        torch.cuda.empty_cache()
    if "nemo" not in args.skip:
        paths["nemo"] = run_nemo(cfg, feed, device, state, args)

    flops = sum(c["flops"] for c in counts)
    positions = sum(c["positions"] for c in counts)
    seconds_audio = audio_seconds(batches)
    rows = {}
    did_not_fit = sorted(name for name, timing in paths.items() if timing.get("out_of_memory"))
    failed = {name: timing["error"] for name, timing in paths.items() if "error" in timing}
    for name, timing in paths.items():
        if name in did_not_fit or name in failed:
            continue
        s = timing["seconds"]
        rows[name] = {
            **timing,
            "audio_s_per_s": seconds_audio / s,
            "tokens_per_s": positions / s,
            "tflops": flops / s / 1e12,
            "mfu": flops / s / 1e12 / peak_tflops if not math.isnan(peak_tflops) else float("nan"),
        }
    print_table(rows, batches, counts, seconds_audio, peak_tflops)
    for name in did_not_fit:
        print(f"{name}: did not fit (CUDA out of memory; {paths[name]['peak_mem_gb']:.1f} GB at the failure)")
    for name, error in failed.items():
        print(f"{name}: failed with {error.strip().splitlines()[-1]} (traceback above and in the JSON)")
    name, best = result_name(rows, args.tiny)
    if best is None:
        print(f"no path ran the recipe's step ({', '.join(RECIPE_VARIANTS)}): the timings go to {name}.json")
    top = rows[best] if best else {}
    write_result(
        name,
        {
            "card": card(device),
            "best_variant": best,
            "mfu": top.get("mfu"),
            "tokens_per_s": top.get("tokens_per_s"),
            "audio_s_per_s": top.get("audio_s_per_s"),
            "ratio_vs_nemo": ratio(rows, best, "nemo"),
            "ratio_vs_plain": ratio(rows, best, "plain"),
            "peak_mem_gb": top.get("peak_mem_gb"),
            "out_of_memory": did_not_fit,
            "failed": failed,
            "bf16_matmul_tflops": peak_tflops,
            "batches": [{**d, **c} for d, c in zip(describe_batches(batches), counts, strict=True)],
            "flops_from": str(counts_from) if counts_from is not None else None,
            "fresh_lengths": args.fresh_lengths,
            "paths": rows,
        },
        args.out,
        record=not args.tiny,
    )


def result_name(rows: dict, tiny: bool) -> tuple[str, str | None]:
    """The JSON's name and the recipe's fastest path (None when no path ran the recipe's step).

    A run of only lever variants (``compiled_fresh_lengths ...``) is no official result, so it must not
    replace ``train_throughput.json``; it goes to ``train_throughput_variants.json`` instead of being lost.
    """
    ours = [name for name in rows if model_variant(name) in RECIPE_VARIANTS]  # the recipe's paths
    best = max(ours, key=lambda n: rows[n]["audio_s_per_s"]) if ours else None
    name = "train_throughput" if best else "train_throughput_variants"
    return name + ("_tiny" if tiny else ""), best


def model_variant(path: str) -> str | None:
    """The model variant of a path name ("ours[compiled]", "ours[zero2,default]", "ours[compiled,ds=lean]")."""
    if not path.startswith("ours["):
        return None
    return next((part for part in path[5:-1].split(",") if part in MODEL_VARIANTS), None)


def describe_batches(batches: list[dict]) -> list[dict]:
    """Clips and padded duration of each batch: how a results JSON names the batches it counted."""
    return [
        {"clips": int(b["audios"].shape[0]), "max_audio_s": b["audios"].shape[1] / SAMPLE_RATE}
        for b in batches
    ]


def reused_counts(path: Path, batches: list[dict]) -> list[dict]:
    """The per-batch FLOP and position counts of an earlier run (``--flops-from``), if it counted these batches.

    The batches are a function of ``--budget-s``, ``--seed`` and ``--tiny``; equal clip counts and
    padded durations (random floats) identify them. The model must be the same too: a results JSON
    does not record it, so reuse counts only of the same commit's model shapes.
    """
    try:
        recorded = json.loads(path.read_text())["batches"]
        counts = [{"flops": int(r["flops"]), "positions": int(r["positions"])} for r in recorded]
        described = [{"clips": int(r["clips"]), "max_audio_s": float(r["max_audio_s"])} for r in recorded]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(
            f"--flops-from {path}: no per-batch counts to reuse ({error}); run without it"
        ) from None
    if described != describe_batches(batches):
        raise SystemExit(
            f"--flops-from {path}: it counted other batches ({described} vs this run's "
            f"{describe_batches(batches)}); use the same --budget-s and --seed, or run without it"
        )
    return counts


def ratio(rows: dict, ours: str | None, baseline: str) -> float | None:
    """``ours`` audio-s/s over ``baseline``'s; None when either did not run."""
    if ours not in rows or baseline not in rows:
        return None
    return rows[ours]["audio_s_per_s"] / rows[baseline]["audio_s_per_s"]


def print_table(rows: dict, batches, counts, seconds_audio: float, peak_tflops: float) -> None:
    print(
        f"\n{len(batches)} bucketed batches, {seconds_audio:.0f} audio s, "
        f"{sum(c['positions'] for c in counts)} LLM positions, {sum(c['flops'] for c in counts) / 1e12:.1f} model TFLOP per pass; "
        f"bf16 matmul ceiling {peak_tflops:.0f} TFLOP/s"
    )
    header = f"{'path':<22}{'s/pass':>8}{'audio-s/s':>11}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}{'x NeMo':>8}{'x plain':>8}"
    print(header)
    for name, row in rows.items():
        vs_nemo = ratio(rows, name, "nemo")
        vs_plain = ratio(rows, name, "plain")
        print(
            f"{name:<22}{row['seconds']:>8.3f}{row['audio_s_per_s']:>11.0f}{row['tokens_per_s']:>10.0f}"
            f"{row['tflops']:>9.1f}{row['mfu']:>7.1%}{row['peak_mem_gb']:>9.1f}"
            f"{(vs_nemo or float('nan')):>8.2f}{(vs_plain or float('nan')):>8.2f}"
        )


if __name__ == "__main__":
    main()
