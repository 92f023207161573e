"""The model and its DeepSpeed engine, built the same way by the training loop and the benchmarks.

``build_model`` makes the SALM (same seed on every rank, directly on the device);
``wrap_in_deepspeed`` puts the loss module, AdamW and the LR schedule under ``deepspeed.initialize``.
The loop restores a checkpoint in between when Ray hands it one (see ``salm.train.loop``).
"""

from __future__ import annotations

import deepspeed
import torch
from omegaconf import DictConfig
from torch import nn

from salm.model.salm import SALM
from salm.train.aux_ctc import EncoderCTC
from salm.train.deepspeed_setup import build_optimizer, deepspeed_config, warmup_cosine
from salm.train.grad_norm import use_fused_gradient_clipping
from salm.train.single_rank_reduction import skip_single_rank_reduction


class LossModule(nn.Module):
    """What DeepSpeed wraps: ``forward(batch)`` is the SALM loss, so the engine's hooks see it.

    With ``aux_ctc_weight > 0`` the loss adds that weight x an encoder CTC loss (``aux_ctc``, for
    encoders trained from scratch); ``out["llm_loss"]`` keeps the LLM's own cross-entropy.
    """

    def __init__(self, salm: SALM, aux_ctc_weight: float = 0.0) -> None:
        super().__init__()
        self.salm = salm
        self.aux_ctc = EncoderCTC(salm, aux_ctc_weight) if aux_ctc_weight > 0 else None

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.salm.loss(batch)
        if self.aux_ctc is not None:
            ctc = self.aux_ctc(batch["texts"])
            out["llm_loss"], out["ctc_loss"] = out["loss"].detach(), ctc.detach()
            out["loss"] = out["loss"] + self.aux_ctc.weight * ctc
        return out


def build_model(cfg: DictConfig, device: torch.device) -> SALM:
    """The recipe's SALM with ``trainer.seed`` (identical random init on every rank), on ``device``.

    Built on the GPU when there is one: random init of a 2.5B model takes seconds there and
    minutes on the host. NeMo's legacy ``torch.FloatTensor`` parameters ignore the device
    context, hence the ``.to``.
    """
    torch.manual_seed(int(cfg.trainer.seed))
    with torch.device(device):
        model = SALM(cfg.model)
    return model.to(device)


def wrap_in_deepspeed(cfg: DictConfig, model: SALM, device: torch.device, start_step: int = 0):
    """``(engine, scheduler)`` for ``model``; the LR schedule starts at ``start_step``.

    DeepSpeed casts the whole module for bf16/fp16; the mel front end (buffers only, no weights)
    is put back to fp32 afterwards. Leaves the model in train mode.
    """
    preprocessor_state = {k: v.clone() for k, v in model.perception.preprocessor.state_dict().items()}
    loss_module = LossModule(model, float(cfg.trainer.get("aux_ctc_weight") or 0.0)).to(device)
    optimizer = build_optimizer([p for p in loss_module.parameters() if p.requires_grad], cfg)
    scheduler = warmup_cosine(optimizer, cfg)
    for _ in range(start_step):
        scheduler.step()
    engine, _, _, _ = deepspeed.initialize(
        model=loss_module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    model.perception.preprocessor.float().load_state_dict(preprocessor_state)
    use_fused_gradient_clipping(engine.optimizer)  # ZeRO-1/2: a fused norm, a clip without a sync
    skip_single_rank_reduction(engine.optimizer)  # ZeRO-1/2 on one rank: no flatten-reduce-copy per bucket
    model.train()
    return engine, scheduler
