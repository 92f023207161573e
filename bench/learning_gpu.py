"""Proof that the platform learns, on one GPU: ``salm quickstart --gpu`` end to end, recorded.

Runs every quickstart step with the GPU preset (``QuickstartSize.gpu``: a small SALM trained from
random weights on 3000 flite utterances, held-out WER on 200 unseen sentences) and writes
``bench/results/learning_gpu.json`` (``card``, ``heldout_wer``, ``untrained_wer``,
``train_minutes``, ``utterances``, ``date``) plus the run's curve and per-step metrics beside it.
Needs ``flite`` on PATH. On the GPU machine::

    PYTHONPATH=$HOME/site:$PWD python3 -m bench.learning_gpu --workdir /tmp/learning --out $OUT
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from bench.common import RESULTS, card, write_result
from salm.quickstart import QuickstartSize, run_quickstart


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/learning_gpu"))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON, curve and metrics here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a GPU (the CPU learning run is `salm quickstart`)")

    size = QuickstartSize.gpu()
    summary = run_quickstart(args.workdir, size)
    for folder in [RESULTS, args.out] if args.out else [RESULTS]:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(summary["plot"], folder / "learning_gpu_curves.png")
        shutil.copy(summary["logs"], folder / "learning_gpu.metrics.jsonl")
    write_result(
        "learning_gpu",
        {
            "card": card(torch.device("cuda")),
            "heldout_wer": summary["heldout_wer"],
            "untrained_wer": summary["untrained_wer"],
            "train_minutes": summary["train_minutes"],
            "utterances": size.train_utterances,
            "heldout_utterances": size.heldout_utterances,
            "heldout": summary["heldout"],
            "max_steps": size.max_steps,
            "rtfx": summary["rtfx"],
            "served_answer": summary["served_answer"],
        },
        args.out,
    )


if __name__ == "__main__":
    main()
