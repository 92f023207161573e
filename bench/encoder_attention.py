"""The Conformer encoder's relative-position attention in training, at canary-qwen-2.5b shapes (GPU).

Forward + backward of a FastConformer slice (d_model 1024, 8 heads, 8x dw_striding, bf16, training
mode with its dropouts) over the five duration buckets of ``bench/train_throughput.py`` (320 audio
seconds each), in variants timed in the same run:

- ``nemo``: NeMo's attention as is (its padded-view ``rel_shift``), eager and compiled per layer
  with ``dynamic=True`` as ``trainer.compile_layers`` does;
- ``strided``: the same with ``salm.model.rel_shift`` (the shift as a strided view);
- ``*_sdpa``: NeMo's ``use_pytorch_sdpa`` path (position scores passed to SDPA as a float mask).

Prints milliseconds per pass over the buckets and each variant against ``nemo`` compiled (what the
canary recipe ran before) and eager::

    python3 -m bench.encoder_attention --layers 4
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench.common import card, sync
from bench.train_throughput import BUCKETS
from salm.model.rel_shift import use_strided_rel_shift

FRAMES_PER_S = 100  # mel frames (10 ms hop)
VARIANTS = ["nemo", "strided", "nemo_sdpa", "strided_sdpa"]


def encoder(layers: int, device: torch.device):
    from nemo.collections.asr.modules import ConformerEncoder

    torch.manual_seed(0)
    return (
        ConformerEncoder(
            feat_in=128,
            n_layers=layers,
            d_model=1024,
            subsampling="dw_striding",
            subsampling_factor=8,
            subsampling_conv_channels=256,
            ff_expansion_factor=4,
            self_attention_model="rel_pos",
            n_heads=8,
            conv_kernel_size=9,
            conv_norm_type="batch_norm",
            dropout=0.1,
            dropout_pre_encoder=0.1,
            dropout_att=0.1,
            xscaling=True,
            untie_biases=True,
            pos_emb_max_len=5000,
        )
        .to(device=device, dtype=torch.bfloat16)
        .train()
    )


def buckets(budget_s: float, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mel features and lengths per bucket: ``budget_s // max`` clips of random duration in the bucket."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for low, high in BUCKETS:
        size = max(1, int(budget_s // high))
        seconds = low + (high - low) * torch.rand(size, generator=generator)
        lengths = (seconds * FRAMES_PER_S).long()
        features = torch.randn(size, 128, int(lengths.max()), generator=generator)
        batches.append((features.to(device, torch.bfloat16), lengths.to(device)))
    return batches


def set_variant(model, variant: str) -> None:
    if variant.startswith("strided"):
        use_strided_rel_shift(model)
    for layer in model.layers:
        layer.self_attn.use_pytorch_sdpa = variant.endswith("_sdpa")


def pass_ms(model, batches, device: torch.device, repeats: int) -> float:
    """Median milliseconds of forward + backward over all buckets."""

    def one_pass() -> None:
        for features, lengths in batches:
            encoded, _ = model(audio_signal=features, length=lengths)
            encoded.float().square().mean().backward()

    one_pass()  # warm-up (compiles the compiled variants)
    one_pass()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        one_pass()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=320.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    base = encoder(args.layers, device)
    batches = buckets(args.budget_s, device)
    rows = {}
    for variant in args.variants:
        for compiled in (False, True):
            model = copy.deepcopy(base)
            set_variant(model, variant)
            if compiled:
                for layer in model.layers:
                    layer.compile(dynamic=True)
            name = f"{variant}{' compiled' if compiled else ''}"
            rows[name] = pass_ms(model, batches, device, args.repeats)
            print(f"{name}: {rows[name]:.1f} ms per pass", flush=True)
            del model
            torch._dynamo.reset()
    print(
        f"\n{card(device)}; {args.layers} Conformer layers, 5 buckets of {args.budget_s:.0f} audio s, fwd+bwd"
    )
    print(f"{'variant':<26}{'ms/pass':>9}{'x nemo compiled':>17}{'x nemo eager':>14}")
    for name, ms in rows.items():
        print(
            f"{name:<26}{ms:>9.1f}{rows.get('nemo compiled', float('nan')) / ms:>17.2f}{rows.get('nemo', float('nan')) / ms:>14.2f}"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "encoder_attention.json").write_text(
            json.dumps({"card": card(device), "layers": args.layers, "ms_per_pass": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
