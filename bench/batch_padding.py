"""How much of the training bench's counted FLOPs are padding, and its MFU on the clips alone.

``bench/train_throughput.py`` counts a batch's model FLOPs with ``FlopCounterMode`` on the padded
batch: every clip runs at the batch's longest audio and longest LLM sequence, as on the GPU. That
is the work the GPU does, so its MFU is the GPU's utilisation; but the padding carries no speech.
This script puts a number on it for the bench's own batches (same ``--budget-s`` and ``--seed``):

- the *fill* of each batch: real audio / the batch's padded audio (the encoder's share), real LLM
  positions / padded LLM positions (the LLM's share);
- the *clip FLOPs*: the counted FLOPs of a results JSON, fitted per batch as
  ``clips * (a*T + b*T^2 + c*L + d*L^2)`` at the padded widths (``T`` audio seconds, ``L`` LLM
  positions: the linear layers and the attention scores of each part), then summed over the
  clips' own ``T`` and ``L``. The share comes out near the two fills whatever encoder/LLM split
  the fit settles on (``T`` and ``L`` grow together, so the split itself is loosely determined):
  the quadratic terms pull it a little below them, the LM head (target positions only, unpadded)
  a little above.

CPU only, about a minute: the batches are built with the tiny recipe, whose encoder frame rate
(``token_equivalent_duration`` 0.08 s) is canary-qwen-2.5b's; the script checks that its LLM
position count equals the one in the JSON::

    python -m bench.batch_padding --counts bench/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, recipe, write_llm_dir
from bench.train_batches import SAMPLE_RATE, make_batches
from bench.train_throughput import reused_counts
from salm.train.engine import build_model


def clip_lengths(model, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """(audio seconds, LLM positions) of every clip of ``batch``, without the batch's padding."""
    with torch.no_grad():
        attention_mask = model.prepare_inputs(batch)["attention_mask"]
    seconds = batch["audio_lens"].double().numpy() / SAMPLE_RATE
    return seconds, attention_mask.sum(dim=1).double().numpy()


def terms(seconds: np.ndarray | float, positions: np.ndarray | float) -> np.ndarray:
    """The fit's terms of one clip (or one padded row): linear and quadratic in audio and LLM length."""
    return np.array([seconds, np.square(seconds), positions, np.square(positions)], dtype=float)


def padding_report(model, batches: list[dict], counts: list[dict], source: Path | str) -> dict:
    """Fills per batch and overall, and the clips' share of the counted FLOPs (see the module doc).

    ``counts`` are a results JSON's per-batch ``flops`` and ``positions`` (from ``source``); a batch
    whose LLM positions differ from this build's is refused: the JSON is of another model or prompt.
    """
    padded_rows, clip_rows, rows = [], [], []
    real_audio = padded_audio = real_positions = padded_positions = 0.0
    for batch, count in zip(batches, counts, strict=True):
        seconds, positions = clip_lengths(model, batch)
        if int(positions.sum()) != count["positions"]:
            raise SystemExit(
                f"{source}: {count['positions']} LLM positions in a batch where this build counts "
                f"{int(positions.sum())}; the JSON is of another model or prompt"
            )
        clips = len(seconds)
        padded_rows.append(clips * terms(seconds.max(), positions.max()))
        clip_rows.append(terms(seconds, positions).sum(axis=1))
        real_audio += seconds.sum()
        padded_audio += clips * seconds.max()
        real_positions += positions.sum()
        padded_positions += clips * positions.max()
        rows.append(
            {
                "clips": clips,
                "max_audio_s": float(seconds.max()),
                "audio_fill": float(seconds.sum() / (clips * seconds.max())),
                "llm_fill": float(positions.sum() / (clips * positions.max())),
            }
        )
    counted = np.array([c["flops"] for c in counts], dtype=float)
    coefficients = np.linalg.lstsq(np.array(padded_rows), counted, rcond=None)[0]
    return {
        "batches": rows,
        "audio_fill": float(real_audio / padded_audio),
        "llm_fill": float(real_positions / padded_positions),
        "counted_tflop": float(counted.sum() / 1e12),
        "fit_residual": float(np.abs(np.array(padded_rows) @ coefficients / counted - 1).max()),
        "clip_flops_share": float((np.array(clip_rows) @ coefficients).sum() / counted.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=Path, default=RESULTS / "train_throughput.json")
    parser.add_argument("--budget-s", type=float, default=640.0, help="as the results JSON's run")
    parser.add_argument("--seed", type=int, default=0, help="as the results JSON's run")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = recipe(write_llm_dir(Path(tmp), tiny=True), tiny=True)
        model = build_model(cfg, torch.device("cpu")).eval()
    batches = make_batches(model, args.budget_s, args.seed, tiny=False)
    counts = reused_counts(args.counts, batches)  # refuses a JSON of other batches
    results = json.loads(args.counts.read_text())
    report = padding_report(model, batches, counts, source=args.counts)
    print(f"{'clips':>6}{'max audio s':>13}{'audio fill':>12}{'LLM fill':>10}")
    for row in report["batches"]:
        print(
            f"{row['clips']:>6}{row['max_audio_s']:>13.2f}{row['audio_fill']:>12.1%}{row['llm_fill']:>10.1%}"
        )
    clip_share = report["clip_flops_share"]
    print(
        f"all batches: audio fill {report['audio_fill']:.1%}, LLM fill {report['llm_fill']:.1%}; clip FLOPs "
        f"{clip_share:.1%} of the counted {report['counted_tflop']:.1f} TFLOP (fit within "
        f"{report['fit_residual']:.2%} of every batch's count)"
    )
    mfu = results.get("mfu")
    if mfu is not None:
        print(
            f"{results.get('best_variant')} in {args.counts.name}: MFU {mfu:.1%} on the padded batches, "
            f"{mfu * clip_share:.1%} on the clips alone"
        )


if __name__ == "__main__":
    main()
