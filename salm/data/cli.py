"""``salm data prepare`` and ``salm data estimate-bins``: argument parsing only, work is in the library."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare Lhotse Shar data and estimate bucket bins")
    actions = data.add_subparsers(dest="data_command", required=True)

    prepare = actions.add_parser(
        "prepare",
        help="NeMo JSON manifests or Lhotse cut manifests -> Lhotse Shar shards (one Ray task per shard)",
    )
    prepare.add_argument("manifests", nargs="+", help="NeMo .json(l) manifests or Lhotse cuts .jsonl(.gz)")
    prepare.add_argument(
        "-o", "--output", required=True, help="output directory (created; must hold no shards)"
    )
    prepare.add_argument("--shard-size", type=int, default=1000, help="cuts per shard")
    prepare.add_argument("--audio-format", default="flac", choices=["flac", "wav", "original"])
    prepare.add_argument(
        "--duration-tolerance",
        type=float,
        default=0.1,
        help="seconds a manifest duration may exceed the audio",
    )
    prepare.set_defaults(func=run_prepare)

    bins = actions.add_parser("estimate-bins", help="estimate `bucket_duration_bins` from Shar cut manifests")
    bins.add_argument("shar_path", nargs="+", help="Shar directories (local or fsspec URLs)")
    bins.add_argument("-b", "--buckets", type=int, default=30, help="number of buckets")
    bins.add_argument("-n", "--num-examples", type=int, default=None, help="use only the first N cuts")
    bins.add_argument("-l", "--min-duration", type=float, default=None)
    bins.add_argument("-u", "--max-duration", type=float, default=None)
    bins.add_argument(
        "--token-mode", action="store_true", help="bins in LLM positions (use_multimodal_sampling)"
    )
    bins.add_argument("--tokenizer", default=None, help="tokenizer directory (token mode)")
    bins.add_argument("--prompt-format", default="qwen")
    bins.add_argument("--token-equivalent-duration", type=float, default=0.08)
    bins.add_argument("--measure-total-length", type=int, choices=[0, 1], default=1)
    bins.set_defaults(func=run_estimate_bins)


def run_prepare(args: argparse.Namespace) -> None:
    from salm.data.prepare import prepare_shar

    summary = prepare_shar(
        args.manifests,
        args.output,
        shard_size=args.shard_size,
        audio_format=args.audio_format,
        duration_tolerance=args.duration_tolerance,
    )
    print(summary.describe())


def run_estimate_bins(args: argparse.Namespace) -> None:
    from salm.data.config import DataConfig
    from salm.data.estimate_bins import estimate_bins

    cfg = DataConfig(
        shar_path=list(args.shar_path),
        min_duration=args.min_duration,
        max_duration=args.max_duration,
        use_multimodal_sampling=args.token_mode,
        token_equivalent_duration=args.token_equivalent_duration,
        measure_total_length=bool(args.measure_total_length),
        batch_size=1,
    )
    bins = estimate_bins(cfg, args.buckets, num_examples=args.num_examples, tokenizer_dir=args.tokenizer)
    print("Use the following options in your config:")
    print(f"\tnum_buckets={args.buckets}")
    print(f"\tbucket_duration_bins=[{','.join(str(b) for b in bins)}]")
