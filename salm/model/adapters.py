"""Modality adapters between the speech encoder and the projection to the LLM.

Adapters take and return NeMo's encoder layout ``(B, D, T)`` with lengths, so any of them can
sit where NeMo's ``IdentityConnector`` or a Conformer adapter sits.
"""

from __future__ import annotations

import torch
from torch import nn


class IdentityAdapter(nn.Module):
    """Pass encoder frames through unchanged (canary-qwen-2.5b; NeMo's ``IdentityConnector``)."""

    subsampling_factor = 1

    def __init__(self, d_model: int | None = None, **_: object) -> None:
        super().__init__()

    def output_lengths(self, length: torch.Tensor) -> torch.Tensor:
        return length

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return audio_signal, self.output_lengths(length)


class StackingMLPAdapter(nn.Module):
    """Stack ``stack`` consecutive frames, then a 2-layer MLP back to ``d_model``.

    Stacking shortens the audio part of the LLM sequence by ``stack`` (fewer LLM positions per
    second), the usual trade of sequence length for adapter width.
    """

    def __init__(self, d_model: int, stack: int = 1, hidden: int | None = None) -> None:
        super().__init__()
        if stack < 1:
            raise ValueError(f"`perception.modality_adapter.stack` must be >= 1, got {stack}")
        self.subsampling_factor = stack
        hidden = hidden or d_model * stack
        self.mlp = nn.Sequential(nn.Linear(d_model * stack, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, dim, frames = audio_signal.shape
        stack = self.subsampling_factor
        padded = -frames % stack
        x = nn.functional.pad(audio_signal, (0, padded)).transpose(1, 2)  # (B, T, D)
        x = x.reshape(batch, (frames + padded) // stack, dim * stack)  # (B, T/stack, D*stack)
        x = self.mlp(x).transpose(1, 2)  # (B, D, T/stack)
        return x, self.output_lengths(length)

    def output_lengths(self, length: torch.Tensor) -> torch.Tensor:
        """Frames after stacking: a partial last stack still makes a frame."""
        return torch.div(length + self.subsampling_factor - 1, self.subsampling_factor, rounding_mode="floor")
