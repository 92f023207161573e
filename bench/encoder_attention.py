"""The Conformer encoder's relative-position attention in training, at canary-qwen-2.5b shapes (GPU).

Forward + backward of a FastConformer slice (d_model 1024, 8 heads, 8x dw_striding, bf16, training
mode with its dropouts) over the five duration buckets of ``bench/train_throughput.py`` (320 audio
seconds each), in variants timed in the same run:

- ``nemo``: NeMo's attention as is (its padded-view ``rel_shift``), eager and compiled per layer
  with ``dynamic=True`` as ``trainer.compile_layers`` does;
- ``strided``: the same with ``salm.model.rel_shift`` (the shift as a strided view);
- ``*_sdpa``: NeMo's ``use_pytorch_sdpa`` path (position scores passed to SDPA as a float mask);
- ``padded_keys``: ``strided`` with each attention's keys padded to a multiple of 8 (masked;
  ``perception.pad_attention_keys_to: 8``, the canary recipe's), so the attention's matmuls are
  8-aligned. The profile of the compiled training step showed ~0.19 s per pass in SM75 ``align1``
  GEMM kernels (BENCHMARKS.md). Until 2026-12-03 this bench's ``aligned`` variant padded the mel
  frames instead (the removed ``perception.pad_frames_to``);
- ``padded_keys_cl``: ``padded_keys`` with the subsampling's convolutions channels-last
  (``salm.model.encoder_layout.use_channels_last_subsampling``). In bf16 and NCHW, PyTorch runs a
  depthwise convolution on its own native kernel (cuDNN only for fp16); channels-last sends it to
  cuDNN. The profile showed ~90 ms per pass in that kernel's backward.

Compiled variants run the Conformer's depthwise convolutions as shifted sums, as ``compile_layers``
does since 2026-12-05 (``salm.model.depthwise_conv``); eager ones run NeMo's. (The removed
``padded_keys_shifted_depthwise`` variant compared the two, at ``d24a258``.)

Prints milliseconds per pass over the buckets and each variant against the first variant compiled,
``nemo`` compiled (what the canary recipe ran before) and ``nemo`` eager::

    python3 -m bench.encoder_attention --layers 4

``--compiled-only`` skips the eager runs: on an H200, NeMo's import, the eager runs of one variant
and the first compile of one layer did not fit in 120 s (2026-12-05).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.common import CONFIGS, card, run_epochs
from bench.train_batches import BUCKETS
from salm.model.compile import compile_layers
from salm.model.encoder_layout import use_channels_last_subsampling
from salm.model.rel_shift import set_key_padding, use_strided_rel_shift

FRAMES_PER_S = 100  # mel frames (10 ms hop)
VARIANTS = ["nemo", "strided", "nemo_sdpa", "strided_sdpa", "padded_keys", "padded_keys_cl"]


def encoder(layers: int, device: torch.device):
    """The canary recipe's FastConformer (its ``perception.encoder`` section), ``layers`` deep, NeMo's own
    attention: built without ``AudioPerception``, which would give it the strided shift."""
    from salm.model.perception import build_from_target

    section = OmegaConf.load(CONFIGS / "salm_canary_qwen_2.5b.yaml").model.perception.encoder
    section.n_layers = layers
    torch.manual_seed(0)
    return build_from_target("encoder", section).to(device=device, dtype=torch.bfloat16).train()


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
    if variant.startswith(("strided", "padded_keys")):
        use_strided_rel_shift(model)
    if variant.startswith("padded_keys"):
        set_key_padding(model, 8)
    if variant == "padded_keys_cl":
        use_channels_last_subsampling(model)
    for layer in model.layers:
        layer.self_attn.use_pytorch_sdpa = variant.endswith("_sdpa")


def train_step(model, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Forward + backward of the encoder on one bucket's mel features."""
    features, lengths = batch
    encoded, _ = model(audio_signal=features, length=lengths)
    encoded.float().square().mean().backward()


def pass_ms(model, batches, device: torch.device, repeats: int) -> float:
    """Median milliseconds of forward + backward over all buckets, after 2 passes (compiling)."""
    return 1000 * run_epochs(
        lambda batch: train_step(model, batch), batches, device, warmup=2, repeats=repeats
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=320.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test")
    parser.add_argument(
        "--compiled-only", action="store_true", help="skip the eager runs (each variant then compiles once)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    base = encoder(args.layers, device)
    batches = buckets(args.budget_s, device)
    rows = {}
    for variant in args.variants:
        for compiled in (True,) if args.compiled_only else (False, True):
            model = copy.deepcopy(base)
            set_variant(model, variant)
            if compiled:
                compile_layers(list(model.layers))  # as training does, without the recipe's cpp_wrapper
            name = f"{variant}{' compiled' if compiled else ''}"
            rows[name] = pass_ms(model, batches, device, args.repeats)
            print(f"{name}: {rows[name]:.1f} ms per pass", flush=True)
            del model
            torch._dynamo.reset()
    print(
        f"\n{card(device)}; {args.layers} Conformer layers, 5 buckets of {args.budget_s:.0f} audio s, fwd+bwd"
    )
    first = f"{args.variants[0]} compiled"
    print(f"{'variant':<26}{'ms/pass':>9}{'x ' + first:>24}{'x nemo compiled':>17}{'x nemo eager':>14}")
    for name, ms in rows.items():
        print(
            f"{name:<26}{ms:>9.1f}{rows[first] / ms:>24.2f}"
            f"{rows.get('nemo compiled', float('nan')) / ms:>17.2f}{rows.get('nemo', float('nan')) / ms:>14.2f}"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "encoder_attention.json").write_text(
            json.dumps({"card": card(device), "layers": args.layers, "ms_per_pass": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
