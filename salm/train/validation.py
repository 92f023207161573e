"""Validation on one or more named sets: loss, token accuracy, and WER of greedy transcripts.

Every rank runs the same validation data (the sets are not split), so under ZeRO-3 all ranks
step through forward and generation together and nobody waits on a rank with fewer batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from salm.metrics import token_accuracy, word_error_rate
from salm.model.salm import SALM
from salm.train.batch_device import to_device
from salm.train.prediction_log import SampleTokens, format_block


@dataclass
class SetTotals:
    loss_sum: float = 0.0
    target_tokens: int = 0
    correct_tokens: int = 0
    references: list[str] = field(default_factory=list)
    hypotheses: list[str] = field(default_factory=list)


@torch.no_grad()
def validate(
    model: SALM,
    val_sets: dict[str, Iterable[dict]],
    prompt: str,
    max_new_tokens: int,
    synced_gpus: bool = False,
    log_samples: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Metrics ``val_{loss,acc,wer}_<name>`` per set plus their means ``val_loss``/``val_acc``/``val_wer``."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        for name, batches in val_sets.items():
            totals = SetTotals()
            logged = 0
            for batch in batches:
                batch = to_device(batch, model.device)
                out = model.loss(batch)
                tokens = int(out["num_target_tokens"])
                totals.loss_sum += float(out["loss"]) * tokens
                totals.target_tokens += tokens
                totals.correct_tokens += int(out["correct_tokens"])
                prompts = [[{"role": "user", "content": prompt}] for _ in batch["texts"]]
                generated = model.generate(
                    prompts,
                    audios=batch["audios"],
                    audio_lens=batch["audio_lens"],
                    max_new_tokens=max_new_tokens,
                    synced_gpus=synced_gpus,
                )
                totals.references += batch["texts"]
                totals.hypotheses += generated.texts
                for row in range(len(batch["texts"])):
                    if logged >= log_samples:
                        break
                    logged += 1
                    sample = sample_tokens(
                        model, batch, row, out["audio_frames"], generated.token_ids[row], generated.texts[row]
                    )
                    log(
                        format_block(
                            f"Validation [{name}]",
                            logged,
                            sample,
                            model.tokenizer,
                            model.audio_locator_tag_id,
                        )
                    )
            metrics[f"val_loss_{name}"] = totals.loss_sum / max(1, totals.target_tokens)
            metrics[f"val_acc_{name}"] = token_accuracy(totals.correct_tokens, totals.target_tokens)
            metrics[f"val_wer_{name}"] = word_error_rate(totals.references, totals.hypotheses).wer
    finally:
        model.train(was_training)
    for kind in ("loss", "acc", "wer"):
        values = [v for k, v in metrics.items() if k.startswith(f"val_{kind}_")]
        if values:
            metrics[f"val_{kind}"] = sum(values) / len(values)
    return metrics


def sample_tokens(
    model: SALM, batch: dict, row: int, audio_frames: torch.Tensor, predicted_ids: list[int], hypothesis: str
) -> SampleTokens:
    """Unpadded ids of example ``row`` (one audio per example, as in ASR batches)."""
    ids = batch["input_ids"][row]
    mask = batch["loss_mask"][row]
    keep = (ids != model.text_pad_id).cumsum(0) > 0  # drop the left padding only
    return SampleTokens(
        input_ids=ids[keep].tolist(),
        answer_ids=ids[mask].tolist(),
        predicted_ids=list(predicted_ids),
        audio_frames=int(audio_frames[row]),
        reference=batch["texts"][row],
        hypothesis=hypothesis,
    )
