"""Does the auxiliary encoder CTC loss make a SALM with a random encoder use the audio? An A/B.

Same corpus, same seed, same steps; only ``trainer.aux_ctc_weight`` differs. Each run is the
quickstart's training (tiny SALM, whole random LLM trainable, 2 Ray Train workers x DeepSpeed
ZeRO-2 on the CPU), then ``salm eval`` of its ``.nemo`` on held-out sentences in an unseen voice.
The text-only level (a model that ignores the audio and guesses the grammar's slots) is ~80% WER
on this corpus, so a run without CTC ending near it has not learned to listen. On 2 cores::

    python -m bench.aux_ctc_ablation      # ~10 minutes; writes bench/results/aux_ctc_ablation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from bench.common import write_result
from salm.quickstart import QuickstartSize, evaluate, make_corpus, recipe


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/aux_ctc_ablation"))
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5], help="aux_ctc_weight values")
    parser.add_argument("--train-utterances", type=int, default=300)
    parser.add_argument("--heldout-utterances", type=int, default=24)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    from salm.assets.tiny_llm import write_tiny_qwen3
    from salm.train.driver import ensure_ray, run_training

    workdir = args.workdir.resolve()
    ensure_ray()
    llm_dir = write_tiny_qwen3(workdir / "tiny_llm")
    corpus = QuickstartSize(
        train_utterances=args.train_utterances,
        heldout_utterances=args.heldout_utterances,
        max_steps=args.steps,
        val_check_interval=args.steps,
    )
    paths = make_corpus(workdir, corpus)
    runs = []
    for weight in args.weights:
        name = f"ctc_{weight:g}"
        done = workdir / "eval" / name / "run.json"
        if done.is_file():  # re-running reuses finished arms, like the quickstart reuses its corpus
            runs.append(json.loads(done.read_text()))
            print(f"aux_ctc_weight {weight:g}: reusing {done}", flush=True)
            continue
        size = dataclasses.replace(
            corpus, overrides=(f"trainer.aux_ctc_weight={weight}", f"exp_manager.name={name}")
        )
        started = time.perf_counter()
        run_training(recipe(workdir, llm_dir, paths, size))
        train_s = time.perf_counter() - started
        metrics = evaluate(
            workdir / "runs" / name / "final.nemo", paths["heldout_manifest"], workdir / "eval" / name
        )
        runs.append({"aux_ctc_weight": weight, "heldout_wer": metrics["wer"], "train_s": round(train_s, 1)})
        done.write_text(json.dumps(runs[-1]))
        print(
            f"aux_ctc_weight {weight:g}: held-out WER {metrics['wer']:.1%}, training {train_s:.0f} s",
            flush=True,
        )

    print(f"\n{'aux_ctc_weight':>14} {'held-out WER':>13} {'training s':>11}")
    for run in runs:
        print(f"{run['aux_ctc_weight']:>14g} {run['heldout_wer']:>13.1%} {run['train_s']:>11.0f}")
    write_result(
        "aux_ctc_ablation",
        {
            "runs": runs,
            "train_utterances": args.train_utterances,
            "heldout_utterances": args.heldout_utterances,
            "heldout": corpus.describe_heldout(),
            "steps": args.steps,
            "wer_ratio_last_vs_first": runs[-1]["heldout_wer"] / max(runs[0]["heldout_wer"], 1e-9),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
