"""Where a batch's GPU time goes, by kernel: ``SALM.generate`` at canary-qwen-2.5b shapes (GPU only).

The model of ``bench/serve_throughput.py`` (random weights, bf16, LoRA merged as a Serve replica
does), ``--batch`` clips of 10 s noise, 48 new tokens. Prints the median seconds of a whole call,
of the perception module (mel + encoder + adapter + projection) and of the mel front end alone, then
torch.profiler's kernel tables (sorted by GPU time) for the perception module and for the whole
call, and the perception module again with NeMo's ``use_pytorch_sdpa`` attention. The tables are
written under ``--out`` too::

    python3 -m bench.profile_generate --batch 256 --out $OUT

``--compile-encoder`` compiles the Conformer layers first, as a Serve replica with
``compile_encoder`` does, so the perception table is the served one. It also times the subsampling
(``encoder.pre_encode``) alone, eagerly and under ``torch.compile(dynamic=True)``: the one part of
the encoder a replica leaves eager, which at batch 256 makes several passes over a 4 GB activation.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import PROMPT, recipe, sync, timed, write_llm_dir
from bench.serve_throughput import SAMPLE_RATE, build_models
from salm.io.nemo_file import merge_lora_into_llm


def median_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up (and the decoder's capture)
    return sorted(timed(fn, device) for _ in range(repeats))[repeats // 2]


def kernel_table(fn, device: torch.device, rows: int) -> str:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)


def time_subsampling(model, audios: torch.Tensor, lens: torch.Tensor, device: torch.device) -> None:
    """The subsampling alone on this batch's features: eager, then compiled (``dynamic=True``)."""
    with torch.no_grad():
        features, feature_lens = model.perception.mel_features(audios, lens)
    encoder_dtype = next(model.perception.encoder.parameters()).dtype  # bf16: the perception casts to it
    # (B, T, F) in the encoder's dtype, as the encoder hands it to pre_encode
    frames_first = features.to(encoder_dtype).transpose(1, 2)
    pre_encode = model.perception.encoder.pre_encode
    compiled = torch.compile(pre_encode, dynamic=True)
    for name, fn in (("eager", pre_encode), ("compiled", compiled)):

        @torch.no_grad()
        def subsampling(fn=fn):
            fn(frames_first, feature_lens)

        try:
            print(f"subsampling {name:8s} {median_seconds(subsampling, device):.4f} s", flush=True)
        except Exception as error:  # a compile failure is a result here, not the end of the profile
            print(f"subsampling {name:8s} failed: {type(error).__name__}: {str(error)[:400]}", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/profile_generate.py profiles CUDA kernels: run it on a GPU machine (BENCHMARKS.md)"
        )
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--compile-encoder", action="store_true", help="compile the Conformer layers first")
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg = recipe(write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=False), tiny=False)
    model, _ = build_models(cfg, device, with_nemo=False)
    merge_lora_into_llm(model)
    if args.compile_encoder:
        from salm.model.compile import compile_layers, encoder_layers

        compile_layers(encoder_layers(model))
    generator = torch.Generator().manual_seed(0)
    audios = (0.1 * torch.randn(args.batch, 10 * SAMPLE_RATE, generator=generator)).to(device)
    lens = torch.full((args.batch,), audios.shape[1]).to(device)
    prompts = [[{"role": "user", "content": PROMPT}] for _ in range(args.batch)]

    def generate():
        model.generate(prompts, audios, lens, max_new_tokens=48)

    @torch.no_grad()
    def perception():
        model.perception(audios, lens)

    @torch.no_grad()
    def mel():
        model.perception.mel_features(audios, lens)

    print(f"generate   {median_seconds(generate, device):.3f} s", flush=True)
    print(f"perception {median_seconds(perception, device):.3f} s", flush=True)
    print(f"mel        {median_seconds(mel, device):.4f} s", flush=True)
    if args.compile_encoder:
        time_subsampling(model, audios, lens, device)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fn, rows in (("perception", perception, 30), ("generate", generate, 40)):
        table = kernel_table(fn, device, rows)
        print(f"{name.upper()} KERNELS (batch {args.batch})\n{table}", flush=True)
        (args.out / f"profile_{name}_b{args.batch}.txt").write_text(table)
    for layer in model.perception.encoder.layers:
        layer.self_attn.use_pytorch_sdpa = True
    print(f"perception with use_pytorch_sdpa {median_seconds(perception, device):.3f} s", flush=True)


if __name__ == "__main__":
    main()
