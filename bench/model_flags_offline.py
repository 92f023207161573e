"""A/B of model config flags in offline transcription: two models, alternating, in one process.

Why: served A/Bs of a model option (``bench/serve_load.py --model-set``) take one run per setting,
each on its own server, and on the GPU machine the first run after a cold start also pays for
empty compile caches. Two runs in a row then differ by the order as much as by the option. Here
both models live in one process and take turns (A, B, A, B, ...), every clip length seen unmeasured
first, so the difference left is the option's. Those first passes are timed on their own
(``first_seen``: what a model pays for a clip length it has not seen yet, e.g. cuDNN building
plans). Each request is timed alone, synchronised, through ``SALM.transcribe`` on the model as a
replica loads it (``serve_load.load_like_a_replica``: LoRA merged, eager encoder, uncompiled
decoding step), each keeping the encoder layout its config sets, since that is what is compared::

    python -m bench.model_flags_offline --canary-shape --sentences-per-clip 3 --batch-sizes 1 16 \
        --out bench/results/model_flags_offline.json

The default B turns off the canary recipe's two encoder layout options
(``perception.channels_last_subsampling``, ``perception.pad_attention_keys_to``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import date
from pathlib import Path

import torch

from bench.common import card, timed
from bench.serve_load import build_random_model, load_like_a_replica, synthesise_clips

ENCODER_LAYOUT_OFF = ["perception.channels_last_subsampling=false", "perception.pad_attention_keys_to=null"]


def timed_batches(model, waves: list, batch_size: int, requests: int, max_new_tokens: int) -> list[float]:
    """Seconds of each batch of ``requests`` clips (cycling through ``waves``), each synchronised."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds = []
    for start in range(0, requests, batch_size):
        batch = [waves[i % len(waves)] for i in range(start, start + batch_size)]
        seconds.append(
            round(timed(lambda b=batch: model.transcribe(b, max_new_tokens=max_new_tokens), device), 4)
        )
    return seconds


def compare(models: dict, waves: list, args: argparse.Namespace) -> list[dict]:
    """Per repeat, model and batch size (in that nesting, so the models alternate): one timed row."""
    rows = []
    for repeat in range(args.repeats):
        for name, model in models.items():
            for batch_size in args.batch_sizes:
                # every clip length once, one clip per batch, kept out of the mean: the first time a
                # model sees a length it may build decoders, cuDNN plans, ... (`first_pass_s` says)
                first_pass = timed_batches(model, waves, 1, len(waves), args.max_new_tokens)
                model.transcribe(waves[:batch_size], max_new_tokens=args.max_new_tokens)
                seconds = timed_batches(model, waves, batch_size, args.requests, args.max_new_tokens)
                row = dict(repeat=repeat, model=name, batch_size=batch_size, seconds_per_batch=seconds)
                row["first_pass_s"] = first_pass
                row["mean_s"] = round(statistics.fmean(seconds), 4)
                print(json.dumps({k: v for k, v in row.items() if k != "seconds_per_batch"}), flush=True)
                rows.append(row)
    return rows


def first_seen(rows: list[dict]) -> dict:
    """Per model: median seconds of a clip the first time the model saw its length (its first row's
    first pass) and the next time (its second row's first pass): what a new input shape costs."""
    medians = {}
    for name in ("A", "B"):
        passes = [r["first_pass_s"] for r in rows if r["model"] == name]
        medians[name] = {
            "first_s": round(statistics.median(passes[0]), 4),
            "again_s": round(statistics.median(passes[1]), 4) if len(passes) > 1 else None,
        }
    return medians


def summary(rows: list[dict], batch_sizes: list[int]) -> list[dict]:
    """Per batch size: each model's mean seconds per batch over every repeat, and B's over A's."""
    table = []
    for batch_size in batch_sizes:
        mean = {
            name: statistics.fmean(s for r in rows if r["model"] == name and r["batch_size"] == batch_size
                                   for s in r["seconds_per_batch"])
            for name in ("A", "B")
        }  # fmt: skip
        table.append(
            dict(batch_size=batch_size, a_s=round(mean["A"], 4), b_s=round(mean["B"], 4),
                 b_over_a=round(mean["B"] / mean["A"], 3))
        )  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--tiny", action="store_true", help="the tiny recipe's model (CPU is fine)")
    shape.add_argument(
        "--canary-shape", action="store_true", help="canary-qwen-2.5b shapes, random weights (GPU)"
    )
    parser.add_argument(
        "--a-set", nargs="*", default=[], help="model A: overrides of the recipe's model config"
    )
    parser.add_argument(
        "--b-set", nargs="*", default=ENCODER_LAYOUT_OFF, help="model B: overrides (default: %(default)s)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--requests", type=int, default=32, help="clips timed per model, batch size and repeat"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds of A then B")
    parser.add_argument(
        "--clips", type=int, default=16, help="synthesised clips (lengths vary with the text)"
    )
    parser.add_argument(
        "--sentences-per-clip", type=int, default=3, help="3: ~10 s clips, the GPU targets' length"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = parser.parse_args()
    if args.a_set == args.b_set:
        parser.error("--a-set and --b-set are the same: there is nothing to compare")
    if min(args.batch_sizes) < 1 or args.requests < max(args.batch_sizes) or args.repeats < 1:
        parser.error("batch sizes must be >= 1, --requests at least the largest batch size, --repeats >= 1")

    from salm.audio import load_audio

    workdir = Path(tempfile.mkdtemp(prefix="model_flags_"))
    paths = synthesise_clips(workdir, args.clips, args.sentences_per_clip)
    kind = "tiny" if args.tiny else "canary_qwen_2.5b_shape"
    models = {}
    for name, overrides in (("A", args.a_set), ("B", args.b_set)):
        models[name] = load_like_a_replica(build_random_model(workdir / name, kind, overrides))
    waves = [load_audio(path, models["A"].sampling_rate) for path in paths]
    rows = compare(models, waves, args)
    table = summary(rows, args.batch_sizes)
    seen = first_seen(rows)
    for line in table:
        print(
            f"batch {line['batch_size']:>4}: A {line['a_s']:.4f} s  B {line['b_s']:.4f} s  B/A {line['b_over_a']:.3f}"
        )
    for name, medians in seen.items():
        print(
            f"{name}: a clip the first time its length is seen {medians['first_s']} s, the next time {medians['again_s']} s"
        )
    result = dict(
        card=card(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        date=date.today().isoformat(),
        a_set=args.a_set,
        b_set=args.b_set,
        clip_s=[round(len(w) / models["A"].sampling_rate, 3) for w in waves],
        summary=table,
        first_seen=seen,
        rows=rows,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
