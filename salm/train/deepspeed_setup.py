"""Our recipe -> a DeepSpeed config, an AdamW over trainable parameters and a warmup+cosine schedule."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

from salm.train.recipe import OPTIMIZER_DEFAULTS, precision_of


def deepspeed_config(cfg: DictConfig) -> dict:
    """The DeepSpeed JSON config equivalent of ``trainer`` + ``deepspeed`` sections.

    ``zero_allow_untested_optimizer``: we hand DeepSpeed torch's AdamW (not its fused Adam), which
    works on CPU and GPU; ``zero_force_ds_cpu_optimizer: false`` keeps it with optimizer offload.
    Our batches vary in size (bucketing), so ``train_micro_batch_size_per_gpu`` is only nominal.
    ``deepspeed.config`` holds any other DeepSpeed keys (timers, bucket sizes, ...), deep-merged
    last; the recipe refuses the keys other fields own.
    """
    ds, trainer = cfg.deepspeed, cfg.trainer
    precision = precision_of(cfg)
    zero: dict = {"stage": int(ds.zero_stage)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(trainer.use_gpu)}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(trainer.use_gpu)}
    generated = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": int(trainer.accumulate_grad_batches),
        "gradient_clipping": float(trainer.gradient_clip_val or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "16", "loss_scale": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    extra = ds.get("config")
    return OmegaConf.to_container(
        OmegaConf.merge(generated, extra if extra is not None else {}), resolve=True
    )


def build_optimizer(parameters: list[torch.nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (frozen ones get no optimizer state).

    ``model.optimizer.fused`` (the default) takes torch's fused AdamW: one kernel reads and writes
    each weight and its two moments once per step. ZeRO-1/2 hand the optimizer its weights as one flat
    fp32 partition, so torch's default (``foreach``) makes ~8 passes over all of them per step: 24 ms
    of an H100's time per step of the canary recipe (BENCHMARKS.md, "The optimizer step"). Same
    update, rounded differently; ``fused: false`` gives torch's default back.
    """
    opt = cfg.model.optimizer
    fused = opt.get("fused", OPTIMIZER_DEFAULTS["fused"])  # the default also where load_recipe did not run
    return torch.optim.AdamW(
        parameters,
        lr=float(opt.lr),
        betas=tuple(opt.betas),
        weight_decay=float(opt.weight_decay),
        fused=True if fused else None,
    )


def warmup_cosine(optimizer: torch.optim.Optimizer, cfg: DictConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at ``max_steps``
    (NeMo's ``CosineAnnealing`` with warmup)."""
    peak = float(cfg.model.optimizer.lr)
    floor = float(cfg.model.lr_scheduler.min_lr) / peak
    warmup = int(cfg.model.lr_scheduler.warmup_steps)
    total = int(cfg.trainer.max_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
