"""Data throughput: our Ray Data pipeline vs Lhotse's own loader, same Shar shards, same CPUs, one run.

Both sides decode FLAC, resample to 16 kHz, tokenize the prompt + transcript with the real Qwen3
tokenizer and deliver bucketed, collated batches (``max_duration`` seconds per batch, the same
bucket bins) to the consuming process:

* ours: ``build_dataset`` (finite, ``num_workers`` read tasks on a Ray cluster of ``--workers``
  CPUs) -> ``iterate_batches`` in the driver, as a train worker would;
* Lhotse: ``CutSet.from_shar`` + ``DynamicBucketingSampler`` + a torch ``DataLoader`` with
  ``--workers`` processes.

Prints audio-seconds per second delivered by each and their ratio, plus the padding ratio with and
without bucketing; writes ``bench/results/data_throughput.json``.

    .venv/bin/python bench/data_throughput.py --utterances 2000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import soundfile
import torch

RESULTS = Path(__file__).resolve().parent / "results"
TAG = "<|audioplaceholder|>"
PAD = 151643


def make_shar(workdir: Path, utterances: int, shard_size: int) -> Path:
    from salm.assets.synthetic_speech import make_sentences, synthesize_corpus
    from salm.data.prepare import prepare_shar

    shar = workdir / f"shar_{utterances}"
    if shar.exists() and any(shar.glob("cuts.*.jsonl.gz")):
        return shar
    voices = ["kal16", "slt", "rms", "awb", "kal", "espeak:en-us"]
    clips = synthesize_corpus(workdir / "speech", make_sentences(utterances, seed=5), voices, workers=2)
    manifest = workdir / f"manifest_{utterances}.json"
    manifest.write_text(
        "".join(
            json.dumps(
                {"audio_filepath": str(c.path), "duration": soundfile.info(c.path).duration, "text": c.text}
            )
            + "\n"
            for c in clips
        )
    )
    print(prepare_shar([str(manifest)], str(shar), shard_size=shard_size).describe())
    return shar


class _LhotseBatches(torch.utils.data.Dataset):
    """Lhotse's side of the comparison: decode + resample + tokenize + collate a sampled CutSet."""

    def __init__(self, cfg, tokenizer_dir: str) -> None:
        self.cfg, self.tokenizer_dir = cfg, tokenizer_dir

    def __getitem__(self, cuts):
        from lhotse.dataset.collation import collate_audio

        from salm.data.processing import encode_example

        cuts = cuts.resample(self.cfg.sample_rate)
        audios, audio_lens = collate_audio(cuts)
        ids = [
            encode_example(c.supervisions[0].text, "", self.cfg, self.tokenizer_dir, "qwen", TAG)[0]
            for c in cuts
        ]
        return {"audios": audios, "audio_lens": audio_lens, "input_ids": ids}


def run_lhotse(
    shar: Path, bins: list[float], max_duration: float, workers: int, tokenizer_dir: str, cfg
) -> dict:
    from lhotse import CutSet
    from lhotse.dataset import DynamicBucketingSampler

    cuts = CutSet.from_shar(in_dir=str(shar))
    sampler = DynamicBucketingSampler(cuts, max_duration=max_duration, duration_bins=bins, shuffle=False)
    loader = torch.utils.data.DataLoader(
        _LhotseBatches(cfg, tokenizer_dir), sampler=sampler, batch_size=None, num_workers=workers
    )
    started, seconds, batches, first = time.perf_counter(), 0.0, 0, None
    for batch in loader:
        first = first or (time.perf_counter(), float(batch["audio_lens"].sum()) / cfg.sample_rate)
        seconds += float(batch["audio_lens"].sum()) / cfg.sample_rate
        batches += 1
    return _rates(started, first, seconds, batches)


def _rates(started: float, first: tuple[float, float], seconds: float, batches: int) -> dict:
    """End to end (start-up included) and steady state (after the first batch)."""
    now = time.perf_counter()
    return {
        "audio_s_per_s": seconds / (now - started),
        "steady_audio_s_per_s": (seconds - first[1]) / max(now - first[0], 1e-9),
        "first_batch_s": first[0] - started,
        "audio_seconds": seconds,
        "batches": batches,
        "wall_s": now - started,
    }


def run_ours(cfg, tokenizer_dir: str) -> tuple[dict, list[dict]]:
    from salm.data.bucketing import iterate_batches
    from salm.data.pipeline import build_dataset

    rows: list[dict] = []
    arrivals: list[tuple[float, float]] = []  # (time, audio seconds) of each row as Ray Data hands it over

    def keep(stream):
        for row in stream:
            arrivals.append((time.perf_counter(), float(row["duration"])))
            rows.append({k: row[k] for k in ("id", "duration", "input_ids", "loss_mask")} | {"audio_len": 0})
            yield row

    dataset = build_dataset(cfg, tokenizer_dir, "qwen", TAG, infinite=False)
    started, seconds, padding, first = time.perf_counter(), 0.0, [], None
    for batch in iterate_batches(keep(dataset.iter_rows()), cfg, PAD):
        first = first or (time.perf_counter(), sum(batch["durations"]))
        seconds += sum(batch["durations"])
        padding.append((batch["metrics"]["padding_ratio"], int(batch["audio_lens"].numel())))
    return _rates(started, first, seconds, len(padding)) | {
        "padding_ratio": _mean_padding(padding),
        **_row_arrival_rates(started, arrivals),
    }, rows


def _row_arrival_rates(started: float, arrivals: list[tuple[float, float]]) -> dict:
    """How fast Ray Data delivers decoded, tokenised rows once the first one is there: the pipeline's
    own rate, which the bucketing buffer (it holds ``bucket_buffer_size`` rows before the first
    batch) hides from the per-batch rates at a small corpus size."""
    (first_time, first_seconds), last_time = arrivals[0], arrivals[-1][0]
    later_seconds = sum(seconds for _, seconds in arrivals) - first_seconds
    return {
        "first_row_s": first_time - started,
        "rows_audio_s_per_s": later_seconds / max(last_time - first_time, 1e-9),
    }


def _mean_padding(batches: list[tuple[float, int]]) -> float:
    return sum(p for p, _ in batches) / max(1, len(batches))


def padding_without_bucketing(rows: list[dict], max_duration: float, rate: int) -> float:
    """Same budget, no buckets: batches in arrival order (lengths only; no audio needed)."""
    from lhotse.dataset.sampling.base import TimeConstraint
    from lhotse.dataset.sampling.dynamic import DurationBatcher

    from salm.data.bucketing import Example
    from salm.data.collate import padding_ratio

    examples = [Example(r["id"], float(r["duration"]), 0, r) for r in rows if r["id"]]
    ratios = [
        padding_ratio([round(e.duration * rate) for e in batch])
        for batch in DurationBatcher(examples, constraint=TimeConstraint(max_duration=max_duration))
    ]
    return sum(ratios) / len(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--utterances", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument(
        "--workers", type=int, default=2, help="Ray CPUs for ours, DataLoader workers for Lhotse"
    )
    parser.add_argument("--max-duration", type=float, default=200.0, help="seconds of audio per batch")
    parser.add_argument("--num-buckets", type=int, default=10)
    parser.add_argument("--workdir", default="/tmp/salm_bench_data")
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    parser.add_argument(
        "--out", default=str(RESULTS / "data_throughput.json"), help="where the JSON result goes"
    )
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from salm.assets.tiny_llm import qwen3_tokenizer_dir
    from salm.data.config import DataConfig
    from salm.data.estimate_bins import estimate_bins

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=args.workers, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    shar = make_shar(workdir, args.utterances, args.shard_size)
    tokenizer_dir = str(qwen3_tokenizer_dir())
    base = {"shar_path": str(shar), "batch_duration": args.max_duration, "num_workers": args.workers}
    bins = estimate_bins(DataConfig(**base), args.num_buckets)
    cfg = DataConfig(**base, use_bucketing=True, bucket_duration_bins=bins)

    ours, rows = run_ours(cfg, tokenizer_dir)
    lhotse = run_lhotse(shar, bins, args.max_duration, args.workers, tokenizer_dir, cfg)
    result = {
        "ratio_vs_lhotse": ours["audio_s_per_s"] / lhotse["audio_s_per_s"],
        "audio_s_per_s": ours["audio_s_per_s"],
        "lhotse_audio_s_per_s": lhotse["audio_s_per_s"],
        "steady_ratio_vs_lhotse": ours["steady_audio_s_per_s"] / lhotse["steady_audio_s_per_s"],
        "rows_audio_s_per_s": ours["rows_audio_s_per_s"],
        "padding_ratio_bucketed": ours["padding_ratio"],
        "padding_ratio_unbucketed": padding_without_bucketing(rows, args.max_duration, cfg.sample_rate),
        "ours": ours,
        "lhotse": lhotse,
        "utterances": args.utterances,
        "hours": ours["audio_seconds"] / 3600,
        "workers": args.workers,
        "max_duration": args.max_duration,
        "num_buckets": args.num_buckets,
        "cpu": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "date": date.today().isoformat(),
        "note": args.note,
    }
    print(
        f"ours {result['audio_s_per_s']:.0f} audio-s/s vs Lhotse {result['lhotse_audio_s_per_s']:.0f} audio-s/s: "
        f"ratio {result['ratio_vs_lhotse']:.2f} (after the first batch: "
        f"{result['steady_ratio_vs_lhotse']:.2f}); padding {result['padding_ratio_bucketed']:.1%} bucketed, "
        f"{result['padding_ratio_unbucketed']:.1%} unbucketed\n"
        f"ours: first row after {ours['first_row_s']:.2f} s, then rows at "
        f"{ours['rows_audio_s_per_s']:.0f} audio-s/s ({ours['rows_audio_s_per_s'] / args.workers:.0f} per worker CPU)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
