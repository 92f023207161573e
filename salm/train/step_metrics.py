"""Training throughput and loss over a logging interval, published as Ray metrics.

Per-step values stay on the device (no ``.item()`` in the step); they are read once per
logging interval. Ray's ``Gauge`` exports them to the dashboard / Prometheus under ``salm_train_*``.
"""

from __future__ import annotations

import torch
from ray.util.metrics import Gauge

GAUGES = {
    "loss": "Training loss (mean cross-entropy over answer tokens)",
    "lr": "Learning rate",
    "grad_norm": "Global gradient norm before clipping",
    "tokens_per_s": "LLM positions (audio frames + text tokens) per second, all workers",
    "audio_s_per_s": "Audio seconds trained per second, all workers",
    "padding_ratio": "Share of the LLM positions computed that are padding (0 with trainer.pack_llm_sequences)",
    "step_time_s": "Seconds per optimizer step",
    "data_wait_share": "Share of the training loop's wall time spent waiting for the next batch (data-bound when high)",
    "gpu_memory_bytes": "Peak GPU memory allocated on worker 0",
}


class StepMeter:
    """Accumulates per-micro-batch outputs; ``flush`` turns them into one metrics dict."""

    def __init__(self, run_name: str, world_size: int) -> None:
        self.world_size = world_size
        self.tags = {"run": run_name}
        self.gauges = {
            name: Gauge(f"salm_train_{name}", description=text, tag_keys=("run",))
            for name, text in GAUGES.items()
        }
        self.last: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.ctc_losses: list[torch.Tensor] = []  # the auxiliary encoder CTC loss, when it is on
        self.positions: list[torch.Tensor] = []
        self.padded_positions = 0
        self.audio_seconds = 0.0
        self.seconds = 0.0
        self.data_wait_seconds = 0.0
        self.steps = 0

    def add(self, out: dict, audio_seconds: float, seconds: float, data_wait_seconds: float = 0.0) -> None:
        """``audio_seconds`` is read from the host copy of the batch, so nothing here waits on the GPU.

        ``seconds`` is the step's own time; ``data_wait_seconds`` the time the loop waited for this
        batch. The rates count the step's time only (what the model does); ``data_wait_share`` says
        how much of the wall the data pipeline cost on top (raise ``data.train_ds.num_workers``)."""
        self.losses.append(out.get("llm_loss", out["loss"]).detach())  # the LLM's cross-entropy, as NeMo logs
        if "ctc_loss" in out:
            self.ctc_losses.append(out["ctc_loss"])
        self.positions.append(out["num_positions"].detach())
        self.padded_positions += int(out["padded_positions"])
        self.audio_seconds += audio_seconds
        self.seconds += seconds
        self.data_wait_seconds += data_wait_seconds
        self.steps += 1

    def flush(self, step: int, lr: float, grad_norm: float | None) -> dict[str, float]:
        positions = float(torch.stack(self.positions).sum())
        seconds = max(self.seconds, 1e-9)
        metrics = {
            "step": step,
            "loss": float(torch.stack(self.losses).float().mean()),
            "lr": float(lr),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": positions / seconds * self.world_size,
            "audio_s_per_s": self.audio_seconds / seconds * self.world_size,
            "padding_ratio": 1.0 - positions / max(self.padded_positions, 1),
            "step_time_s": seconds / max(self.steps, 1),
            "data_wait_share": self.data_wait_seconds / max(self.data_wait_seconds + self.seconds, 1e-9),
            "gpu_memory_bytes": float(torch.cuda.max_memory_allocated())
            if torch.cuda.is_available()
            else 0.0,
        }
        if self.ctc_losses:
            metrics["ctc_loss"] = float(torch.stack(self.ctc_losses).float().mean())
        for name, gauge in self.gauges.items():
            gauge.set(metrics[name], tags=self.tags)
        self.last = metrics
        self._reset()
        return metrics

    @staticmethod
    def describe(metrics: dict[str, float], max_steps: int) -> str:
        ctc = f" | ctc {metrics['ctc_loss']:.3f}" if "ctc_loss" in metrics else ""
        return (
            f"step {metrics['step']:>6}/{max_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"grad {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:.0f} tok/s | "
            f"{metrics['audio_s_per_s']:.1f} audio-s/s | pad {metrics['padding_ratio']:.1%} | "
            f"{metrics['step_time_s']:.2f} s/step | data wait {metrics['data_wait_share']:.0%}{ctc}"
        )
