"""What a new input shape costs the FastConformer encoder, per encoder layout option.

Why: served on an H200 with the canary recipe's layout options on (``channels_last_subsampling``,
``pad_attention_keys_to: 8``), each new clip length cost its first request 0.3-0.6 s; with both off
it cost nothing (BENCHMARKS.md, "the encoder layout options"). Real bucketed training batches also
bring a new frame count at nearly every step, while ``bench/train_throughput.py`` repeats five
batches and never meets one. This times the encoder (the recipe's, with ``--layers`` of its
Conformer layers) on frame counts it has never seen, then on the same ones again, for each
combination of the two options in one process (and with the subsampling's cuDNN convolutions run as
matmuls, ``salm.model.subsampling_convs``); the difference is the cost of a new shape::

    python -m bench.new_shape_cost --layers 2 --batch 8 --lengths 12 --train --out $OUT

``--op-diff`` also profiles each set's first unseen frame count and its repeat, and prints the host
ops whose time grew most: what a new shape pays for.

Each option set gets frame counts of its own, so no set meets a shape another set has already
shown the kernels. ``--train`` adds the backward pass (training); without it, inference (serving).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.common import CONFIGS, card, timed, write_result

# (channels_last_subsampling, pad_attention_keys_to, which subsampling convolutions run as matmuls:
# none, "pointwise", or "stem and pointwise") per option set
OPTION_SETS = {
    "channels_last_and_padded_keys": (True, 8, None),
    "channels_last_only": (True, None, None),
    "padded_keys_only": (False, 8, None),  # the canary recipe until subsampling_convs
    "neither": (False, None, None),
    "padded_keys_matmul_pointwise": (False, 8, "pointwise"),
    "padded_keys_matmul_subsampling": (False, 8, "stem and pointwise"),
}


def build_perception(tiny: bool, layers: int, device: torch.device, dtype: torch.dtype):
    """The recipe's audio perception (random weights) with ``layers`` Conformer layers."""
    from salm.model.perception import AudioPerception

    cfg = OmegaConf.load(CONFIGS / ("tiny.yaml" if tiny else "salm_canary_qwen_2.5b.yaml")).model.perception
    cfg.encoder.n_layers = layers
    cfg.output_dim = cfg.encoder.d_model
    torch.manual_seed(0)
    return AudioPerception(cfg).to(device=device, dtype=dtype)


def frame_counts(option_index: int, sets: int, count: int, first: int) -> list[int]:
    """``count`` mel frame counts that none of the other ``sets`` uses, 8 apart from any other set's
    (so they differ after the 8x subsampling too): the sets take turns along one rising sequence."""
    return [first + 8 * (step * sets + option_index) for step in range(count)]


def layout_seen(perception) -> dict:
    """The layout the encoder's modules actually carry: the options' effect, checked, not assumed."""
    from salm.model.encoder_layout import uses_channels_last_subsampling
    from salm.model.rel_shift import StridedRelPositionAttention
    from salm.model.subsampling_convs import PointwiseConv2dAsMatmul, StemConvAsMatmul

    multiples = {
        m.key_multiple for m in perception.encoder.modules() if isinstance(m, StridedRelPositionAttention)
    }
    return {
        "channels_last_hook": uses_channels_last_subsampling(perception.encoder),
        "key_multiples": sorted(multiples),
        "subsampling_matmuls": sum(
            isinstance(m, (PointwiseConv2dAsMatmul, StemConvAsMatmul)) for m in perception.encoder.modules()
        ),
    }


def encoder_call(perception, batch: int, frames: int, train: bool, device: torch.device, dtype: torch.dtype):
    """One forward (and backward with ``train``) of the encoder on random features of ``frames`` frames."""
    features = torch.randn(batch, perception.encoder._feat_in, frames, device=device, dtype=dtype)
    lengths = torch.full((batch,), frames, device=device, dtype=torch.long)
    lengths[1:] -= torch.arange(1, batch, device=device) % 7  # ragged, as bucketed clips are

    def call() -> None:
        with torch.set_grad_enabled(train):
            encoded, _ = perception.encoder(audio_signal=features, length=lengths)
            if train:
                encoded.float().square().mean().backward()

    return call


def host_op_growth(call, device: torch.device, rows: int = 12) -> list[dict]:
    """Profile ``call`` on a shape it has never seen, then again: the host ops whose own time grew most."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    self_ms = []
    for _ in range(2):
        with profile(activities=activities) as prof:
            timed(call, device)
        self_ms.append({e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()})
    first, again = self_ms
    growth = sorted(((first[k] - again.get(k, 0.0), k) for k in first), reverse=True)[:rows]
    return [
        {
            "op": key,
            "first_ms": round(first[key], 3),
            "again_ms": round(again.get(key, 0.0), 3),
            "grew_ms": round(ms, 3),
        }
        for ms, key in growth
    ]


def measure(perception, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Per option set: seconds of each call on unseen frame counts, then on the same ones again."""
    from salm.model.subsampling_convs import use_matmul_subsampling_convs

    perception.train(args.train)
    results = {}
    for index, name in enumerate(args.sets):
        channels_last, key_multiple, matmul_subsampling = OPTION_SETS[name]
        perception.set_encoder_layout(channels_last, key_multiple)
        use_matmul_subsampling_convs(
            perception.encoder, enabled=matmul_subsampling is not None, stem=matmul_subsampling != "pointwise"
        )
        timed(encoder_call(perception, args.batch, args.first_frames - 8, args.train, device, dtype), device)
        counts = frame_counts(index, len(args.sets), args.lengths + args.op_diff, args.first_frames)
        if args.op_diff:  # a frame count of its own, so the timed ones stay unseen
            growth = host_op_growth(
                encoder_call(perception, args.batch, counts.pop(), args.train, device, dtype), device
            )
            grown = ", ".join(f"{row['op']} {row['grew_ms']:+.2f}" for row in growth)
            print(f"{name}: host ops that grew on a new shape (ms): {grown}", flush=True)
        calls = [encoder_call(perception, args.batch, n, args.train, device, dtype) for n in counts]
        first = [round(timed(call, device), 5) for call in calls]
        again = [round(timed(call, device), 5) for call in calls]
        cost = statistics.fmean(first) - statistics.fmean(again)
        results[name] = {
            "channels_last_subsampling": channels_last,
            "pad_attention_keys_to": key_multiple,
            "matmul_subsampling": matmul_subsampling,
            "layout_seen": layout_seen(perception),
            "frames": counts,
            "first_s": first,
            "again_s": again,
            "new_shape_cost_s": round(cost, 5),
            **({"host_op_growth": growth} if args.op_diff else {}),
        }
        print(
            f"{name:>20}: first {statistics.fmean(first):.4f} s, again {statistics.fmean(again):.4f} s, "
            f"a new shape costs {cost:+.4f} s",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe's encoder (CPU smoke run)")
    parser.add_argument("--layers", type=int, default=2, help="Conformer layers (the recipe has 32)")
    parser.add_argument("--batch", type=int, default=8, help="clips per call")
    parser.add_argument("--lengths", type=int, default=12, help="unseen frame counts per option set")
    parser.add_argument(
        "--first-frames", type=int, default=1001, help="mel frames of the shortest (10 ms each)"
    )
    parser.add_argument("--train", action="store_true", help="forward and backward, as training runs it")
    parser.add_argument(
        "--sets", nargs="+", choices=list(OPTION_SETS), default=list(OPTION_SETS), help="option sets"
    )
    parser.add_argument(
        "--op-diff", action="store_true", help="also profile one new shape per set: which host ops grew"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    args.sets = list(dict.fromkeys(args.sets))
    if args.layers < 1 or args.batch < 2 or args.lengths < 1 or args.first_frames < 64:
        parser.error("need --layers >= 1, --batch >= 2, --lengths >= 1 and --first-frames >= 64")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    perception = build_perception(args.tiny, args.layers, device, dtype)
    results = measure(perception, args, device, dtype)
    write_result(
        "new_shape_cost" + ("_train" if args.train else "") + ("_tiny" if args.tiny else ""),
        {
            "card": card(device),
            "layers": args.layers,
            "batch": args.batch,
            "train": args.train,
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "option_sets": results,
        },
        args.out,
        record=not args.tiny,
    )


if __name__ == "__main__":
    main()
