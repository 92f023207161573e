"""Batched transcription speed (RTFx) of 10 s clips: our generate vs transformers' vs NeMo's SALM.

Same model (canary-qwen-2.5b shapes, random weights, bf16, eval) and the same clips through:

- ours: ``SALM.generate`` (greedy: static KV cache, one CUDA graph replay per token);
- generate: plain ``transformers`` ``generate`` on the same LLM and the same input embeddings
  (what ``SALM.generate`` did before the static decoder);
- nemo: NeMo 3.0's ``SALM.generate`` with our weights loaded.

Every path makes exactly ``--new-tokens`` tokens: the EOS row of the tied embedding / LM head is
zeroed, so with random weights EOS never wins the argmax (a real model stops at its own EOS).
RTFx = audio seconds / wall seconds of one call (prompt encoding, encoder, prefill, decoding,
detokenising), median of ``--repeats`` calls after one warm-up call per batch size.

What each optimisation of ours buys is measured in the same run with ``--ours-variants``:

- ``unpadded_keys``: ours with NeMo's ``T`` attention keys in the encoder (``perception.pad_attention_keys_to:
  0``) instead of the canary recipe's 8 (``salm.model.rel_shift.pad_keys``), for this path only.
  Serve replicas run this layout (``Transcriber.user_config.keep_encoder_layout: false``); the
  offline rows keep the model's, since on one warmed clip length the two are level;
- ``conv_pointwise``: ours with the Conformer's pointwise convolutions as NeMo's ``Conv1d`` over
  ``[B, C, T]`` instead of matmuls over ``[B, T, C]`` (``salm.model.pointwise_conv``), for this path only;
- ``transformers_sdpa``: ours with transformers' own ``sdpa`` attention in the decoder instead of
  ``sdpa_on_kv_heads`` (``salm/model/decoding.py``): with a mask it copies the KV cache per query
  group in the prefill (``repeat_kv``) and packs the groups for one eager query (``pack_gqa``);
- ``merged_lora``: ours with LoRA folded into the LLM weights (what the Serve replica does at load,
  and ``salm export --merge-lora``);
- ``compiled_decode``: ours with the greedy decoding step compiled (``SALM.compile_decoding``, what
  the Serve replica's ``compile_decoding`` option turns on), then captured as before;
- ``compiled_prefill``: ours with the greedy decoder's prefill compiled too (``SALM.compile_prefill``,
  ``decoding.compiled_prefill``, what the Serve replica's ``compile_prefill`` option turns on);
- ``compiled_encoder``: ours with every Conformer layer compiled (``salm.model.compile``), what the
  Serve replica's ``compile_encoder`` option does;
- ``whole_cache_decoding``: ours (everything above on) with every decoding step attending to the whole
  KV cache, as it did before ``decoding.attended_slots``: the "before" of attending only to the
  slots in use, for this path only. The cache holds prompt + ``--new-tokens`` slots rounded up to
  64, so the two differ only when the tokens cross a 64-slot boundary: run it with
  ``--new-tokens 128`` (the served default) to see what a server gets;
- ``compiled_encoder_conv_depthwise``: that with the compiled layers' depthwise convolutions as
  NeMo's cuDNN ``Conv1d`` again, not ``compile_layers``' shifted sums (``salm.model.depthwise_conv``):
  the "before" of that change (its first call traces the layers again).

Variants change the model in place and run in this order after the other paths, so each one
includes the ones before it (``compiled_encoder`` is on the merged model with the compiled step);
``unpadded_keys``, ``conv_pointwise``, ``transformers_sdpa`` and ``whole_cache_decoding`` are undone after
their own path.

``--serve-load`` then frees the GPU and runs ``bench/serve_load.py`` on the same model shape (random
weights saved and served by Ray Serve, flite clips of ~9 s, 1/16/64/256 concurrent clients):
throughput and p50/p99 latency over HTTP, ``p99_s_at_64`` in the JSON. The server runs
``serve/config.yaml``'s settings, so on a GPU its replica compiles the encoder's layers, the
decoding step and the prefill at start (33 s on an H200; 96 s and 172 s on one H100; 19, 76 and
91 s on another); ``--serve-set Transcriber.user_config.compile_decoding=false
Transcriber.user_config.compile_encoder=false Transcriber.user_config.compile_prefill=false`` serves
eagerly.
When one device call is too short for both parts, run ``--serve-load-only`` (writes
``serve_throughput_served.json``), then the offline part with ``--served-from`` that file.

``--phases`` adds one call per batch size of each ``ours`` path with the device drained at each
phase boundary (forward hooks): where the time goes. Run::

    PYTHONPATH=$HOME/site:$PWD python3 -m bench.serve_throughput --out $OUT

``--tiny`` runs the tiny recipe on CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

from bench.common import (
    PROMPT,
    RESULTS,
    card,
    peak_gb,
    recipe,
    set_pointwise_class,
    sync,
    timed,
    write_llm_dir,
    write_result,
)
from salm.model import decoding
from salm.model.llm import base_causal_lm, embedding_inside
from salm.model.pointwise_conv import PointwiseConvAsMatmul
from salm.model.rel_shift import set_key_padding

SAMPLE_RATE = 16000


def build_models(cfg, device: torch.device, with_nemo: bool):
    """Our SALM and (optionally) NeMo's with the same weights, both bf16 on ``device``, eval mode."""
    from salm.model.salm import SALM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        ours = SALM(cfg.model)
    with torch.no_grad():
        ours.embed_tokens.weight[ours.text_eos_id] = 0  # tied LM head: EOS logit 0, never the argmax
        base_causal_lm(ours.llm).lm_head.weight[ours.text_eos_id] = 0
    ours.to(device=device, dtype=dtype).eval()  # legacy constructors (FloatTensor) ignore torch.device()
    ours.perception.preprocessor.float()
    nemo = None
    if with_nemo:
        from nemo.collections.speechlm2 import SALM as NeMoSALM

        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg["perception"]["output_dim"] = ours.llm.config.hidden_size
        with torch.device(device):
            nemo = NeMoSALM(model_cfg)
        nemo.load_state_dict(ours.state_dict(), strict=True)
        nemo.to(device=device, dtype=dtype).eval()
        nemo.perception.preprocessor.float()
    return ours, nemo


def paths(ours, nemo, new_tokens: int) -> dict:
    """name -> fn(audios, audio_lens) returning token id rows; each includes detokenising."""
    prompts_for = lambda n: [[{"role": "user", "content": PROMPT}] for _ in range(n)]  # noqa: E731
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=ours.text_eos_id,
        pad_token_id=ours.text_pad_id,
        bos_token_id=None,
    )

    def run_ours(audios, lens):
        return ours.generate(prompts_for(len(lens)), audios, lens, max_new_tokens=new_tokens).token_ids

    def run_generate(audios, lens):
        with torch.no_grad():
            embeds, mask = ours.prepare_generation_inputs(prompts_for(len(lens)), audios, lens)
            with embedding_inside(ours.llm, ours.embed_tokens):
                out = ours.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)
        ids = out.tolist()
        ours.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return ids

    def run_nemo(audios, lens):
        # autocast: NeMo's fp32 mel features meet bf16 encoder weights (Lightning's bf16 casts inputs)
        with (
            torch.no_grad(),
            torch.autocast(nemo.device.type, dtype=torch.bfloat16, enabled=nemo.device.type == "cuda"),
        ):
            out = nemo.generate(
                prompts=prompts_for(len(lens)),
                audios=audios.to(nemo.device),
                audio_lens=lens.to(nemo.device),
                generation_config=config,
            )
        ids = out.tolist()
        ours.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return ids

    named = {"ours": run_ours, "generate": run_generate}
    if nemo is not None:
        named["nemo"] = run_nemo
    return named


# Serve limits above the concurrency tested, so the load test measures batching, not admission control.
SERVE_LIMITS = [
    "Transcriber.max_ongoing_requests=256",
    "Transcriber.max_queued_requests=512",
    "Ingress.max_ongoing_requests=512",
    "Ingress.max_queued_requests=1024",
    "Transcriber.user_config.max_batch_audio_s=2560",
]
OURS_VARIANTS = (
    "unpadded_keys",
    "conv_pointwise",
    "transformers_sdpa",
    "merged_lora",
    "compiled_decode",
    "compiled_prefill",
    "compiled_encoder",
    "whole_cache_decoding",
    "compiled_encoder_conv_depthwise",
)


ATTENDED_SLOTS = decoding.attended_slots


def attend_whole_cache(position: int, max_len: int) -> int:
    """``decoding.attended_slots`` of the ``whole_cache_decoding`` variant: every step reads the whole cache."""
    return max_len


def token_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """The share of positions where two paths' token rows (same batch, same length) agree."""
    same = sum(a == b for x, y in zip(tokens, reference, strict=True) for a, b in zip(x, y, strict=True))
    return same / sum(len(row) for row in reference)


def transformers_sdpa_in_decoding(enabled: bool) -> None:
    """Make the greedy decoder run transformers' ``sdpa`` attention (what it ran before
    ``sdpa_on_kv_heads``): the ``transformers_sdpa`` variant's before/after."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from salm.model.decoding import KV_HEAD_ATTENTION, sdpa_on_kv_heads

    AttentionInterface.register(KV_HEAD_ATTENTION, sdpa_attention_forward if enabled else sdpa_on_kv_heads)


def phase_seconds(model, fn, audios: torch.Tensor, lens: torch.Tensor, device: torch.device) -> dict:
    """One call of ``fn`` split at module boundaries, the device drained at each (forward hooks).

    prompts: tokenising the chat prompts (until the mel front end starts); mel: the front end;
    encoder: Conformer + adapter + projection; splice: text embeddings, placeholder splicing and
    fetching the captured decoder; prefill: the LLM over the prompts and the first token; decode: the
    remaining tokens and detokenising.
    """
    marks: dict[str, float] = {}

    def mark(name: str):
        def hook(*_):
            if name not in marks:  # decoding steps call the LLM again: keep the first (prefill)
                sync(device)
                marks[name] = time.perf_counter()

        return hook

    handles = [
        model.perception.preprocessor.register_forward_pre_hook(mark("prompts")),
        model.perception.preprocessor.register_forward_hook(mark("mel")),
        model.perception.register_forward_hook(mark("encoder")),
    ]
    # The prefill is marked around ``SALM._prefill``, not by hooks on the LLM: a compiled prefill
    # runs the LLM inside a trace made before the hooks existed, so they would not fire (KeyError
    # 'splice' on an H100, bench/results/serve_throughput_h100_phases_prefill_keyerror.json).
    prefill = model._prefill

    def marked_prefill(*args, **kwargs) -> None:
        mark("splice")()
        prefill(*args, **kwargs)
        mark("prefill")()

    model._prefill = marked_prefill
    try:
        sync(device)
        start = time.perf_counter()
        fn(audios, lens)
        sync(device)
        marks["decode"] = time.perf_counter()
    finally:
        del model._prefill
        for handle in handles:
            handle.remove()
    names = ["prompts", "mel", "encoder", "splice", "prefill", "decode"]
    times = [start] + [marks[n] for n in names]
    return {name: round(b - a, 4) for name, a, b in zip(names, times[:-1], times[1:], strict=True)}


def run_serve_load(args: argparse.Namespace, out: Path) -> dict:
    """``bench/serve_load.py`` in a subprocess (its own Ray cluster), one run per concurrency, with
    this command's ``--serve-*`` options; its JSON goes to ``out``. Returns the summary per
    concurrency (``served_summary``)."""
    tiny, requests = args.tiny, args.serve_requests
    command = [sys.executable, "-m", "bench.serve_load", "--tiny" if tiny else "--canary-shape"]
    command += [
        "--sentences-per-clip",
        "3",
        "--concurrency",
        "1",
        "16",
        "64",
        "256",
        "--requests",
        str(requests),
    ]
    command += [
        "--max-new-tokens",
        str(args.new_tokens),
        "--num-cpus",
        "4" if tiny else "12",
        "--out",
        str(out),
    ]
    command += ["--set", *SERVE_LIMITS, *args.serve_set]
    command += ["--python-proxy"] if args.serve_python_proxy else []
    subprocess.run(command, check=True)
    return served_summary(json.loads(out.read_text()))


def served_summary(serve_load_result: dict) -> dict:
    """Per concurrency, the numbers ``serve_throughput.json`` keeps from a ``bench/serve_load.py`` result."""
    runs = serve_load_result["runs"]
    keep = (
        "requests",
        "audio_s_per_s",
        "p50_s",
        "p99_s",
        "errors",
        "mean_requests_per_batch",
        "model_busy_fraction",
        "decoder_captures",
        "decoder_capture_s",
        "mean_batch_s",
        "model_wait_p99_s",
    )
    return {str(run["concurrency"]): {k: run.get(k) for k in keep} for run in runs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny recipe on CPU: a smoke test")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    parser.add_argument("--clip-s", type=float, default=10.0)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-nemo", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument(
        "--ours-variants", nargs="*", default=[], choices=OURS_VARIANTS, help="before/after variants of ours"
    )
    parser.add_argument("--phases", action="store_true", help="time the phases of each ours path")
    parser.add_argument(
        "--serve-load", action="store_true", help="then the Ray Serve load test (bench/serve_load.py)"
    )
    parser.add_argument(
        "--serve-requests",
        type=int,
        default=128,
        help="at least this many per concurrency (and 8 per client), after 2 uncounted rounds",
    )
    parser.add_argument("--serve-set", nargs="*", default=[], help="more server overrides for --serve-load")
    parser.add_argument(
        "--serve-python-proxy",
        action="store_true",
        help="--serve-load with Serve's Python HTTP proxy instead of its throughput mode (the default)",
    )
    parser.add_argument(
        "--serve-load-only",
        action="store_true",
        help="only the Ray Serve load test, its JSON as serve_throughput_served.json in --out "
        "(else bench/results): the first of two device calls when one is too short for both parts",
    )
    parser.add_argument(
        "--served-from",
        type=Path,
        default=None,
        help="the serve_throughput_served.json of a --serve-load-only run on the same machine, "
        "used instead of --serve-load: the second of the two calls",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.serve_load_only:
        served_out = (args.out or RESULTS) / (
            "serve_throughput_served" + ("_tiny" if args.tiny else "") + ".json"
        )
        served = run_serve_load(args, served_out)
        print(f"served over HTTP: {json.dumps(served)}", flush=True)
        return
    if args.served_from is not None and args.serve_load:
        parser.error("--served-from replaces --serve-load: give one of them")
    if (
        "compiled_encoder_conv_depthwise" in args.ours_variants
        and "compiled_encoder" not in args.ours_variants
    ):
        parser.error(
            "--ours-variants compiled_encoder_conv_depthwise is the 'before' of compiled_encoder: give both"
        )
    served = None
    if args.served_from is not None:
        if not args.served_from.is_file():
            parser.error(f"--served-from {args.served_from}: no such file (make it with --serve-load-only)")
        served_from = json.loads(args.served_from.read_text())
        if "runs" not in served_from:
            parser.error(f"--served-from {args.served_from}: not a --serve-load-only result (no 'runs')")
        served = served_summary(served_from)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = recipe(write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=args.tiny), tiny=args.tiny)
    ours, nemo = build_models(cfg, device, with_nemo=not args.skip_nemo)
    named = paths(ours, nemo, args.new_tokens)
    if args.skip_generate:
        del named["generate"]
    # "compiled_encoder" (and its "before") last: it compiles in place, so the paths after it would run it too
    for variant in sorted(args.ours_variants, key=OURS_VARIANTS.index):
        named[f"ours_{variant}"] = named["ours"]
    print(f"card: {card(device)}", flush=True)

    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for batch in args.batch_sizes:
        audios = 0.1 * torch.randn(batch, int(args.clip_s * SAMPLE_RATE), generator=generator)
        inputs[batch] = (audios.to(device), torch.full((batch,), audios.shape[1]).to(device))

    rows: dict[int, dict] = {batch: {} for batch in args.batch_sizes}
    outputs: dict[str, dict[int, list]] = {}
    errors: dict[str, str] = {}
    for name, fn in named.items():  # path-major: a variant changes the model for the paths after it
        try:
            if name == "ours_unpadded_keys":
                set_key_padding(ours.perception.encoder, 0)
            if name == "ours_conv_pointwise":
                set_pointwise_class(ours.perception.encoder, torch.nn.Conv1d)
            if name == "ours_transformers_sdpa":
                transformers_sdpa_in_decoding(True)
                ours._decoders.clear()  # captured graphs hold the attention they were captured with
            if name == "ours_merged_lora":
                from salm.io.nemo_file import merge_lora_into_llm

                merge_lora_into_llm(ours)  # new parameters: the decoder cache recaptures
            if name == "ours_compiled_decode":
                ours.compile_decoding = True
            if name == "ours_compiled_prefill":
                ours.compile_prefill = True
            if name == "ours_compiled_encoder":  # as a replica with user_config.compile_encoder does
                from salm.inference_compile import compile_encoder_now

                failure = compile_encoder_now(ours, ours.default_prompt)
                if failure is not None:  # the layers are eager again: this variant would time nothing new
                    raise RuntimeError(f"compiling the encoder failed: {failure}")
            if name == "ours_whole_cache_decoding":
                decoding.attended_slots = attend_whole_cache
            if name == "ours_compiled_encoder_conv_depthwise":
                from salm.model.depthwise_conv import use_shifted_sum_depthwise_convs

                use_shifted_sum_depthwise_convs(ours.perception.encoder, enabled=False)
            outputs[name] = {}
            for batch, (audios, lens) in inputs.items():
                sync(device)
                started = time.perf_counter()
                outputs[name][batch] = fn(audios, lens)  # warm-up: captures (and compiles) for this size
                sync(device)
                first_s = time.perf_counter() - started
                times = sorted(
                    timed(lambda fn=fn, a=audios, n=lens: fn(a, n), device) for _ in range(args.repeats)
                )
                seconds = times[len(times) // 2]
                row = rows[batch][name] = {
                    "seconds": seconds,
                    "rtfx": batch * args.clip_s / seconds,
                    "first_call_s": round(first_s, 3),
                }
                if args.phases and name.startswith("ours"):
                    row["phases"] = phase_seconds(ours, fn, audios, lens, device)
                print(
                    f"B={batch:<4} {name:<15} {seconds:7.3f} s  RTFx {row['rtfx']:8.0f}  (first call {first_s:.1f} s)"
                    + (f"  phases {row['phases']}" if "phases" in row else ""),
                    flush=True,
                )
        except Exception as error:  # one failing variant must not lose the others' numbers
            errors[name] = f"{type(error).__name__}: {error}"
            print(f"{name} FAILED: {errors[name]}", flush=True)
        finally:
            if name == "ours_unpadded_keys":
                set_key_padding(ours.perception.encoder, cfg.model.perception.get("pad_attention_keys_to"))
            if name == "ours_conv_pointwise":
                set_pointwise_class(ours.perception.encoder, PointwiseConvAsMatmul)
            if name == "ours_transformers_sdpa":
                transformers_sdpa_in_decoding(False)
                ours._decoders.clear()
            if name == "ours_whole_cache_decoding":
                decoding.attended_slots = ATTENDED_SLOTS

    for batch in args.batch_sizes:
        lengths = {name: len(out[batch][0]) for name, out in outputs.items() if batch in out}
        assert all(n == args.new_tokens for n in lengths.values()), f"tokens made per path: {lengths}"
        if all(batch in outputs.get(n, {}) for n in ("ours", "generate")):
            # bf16 kernels differ between paths (mask layout, cache shapes): near-ties in the argmax can flip.
            rows[batch]["same_tokens_as_generate"] = token_agreement(
                outputs["ours"][batch], outputs["generate"][batch]
            )
        # what each variant of ours changes in the tokens (nothing, ideally)
        for name, out in outputs.items():
            if name.startswith("ours_") and name in rows[batch] and batch in outputs.get("ours", {}):
                rows[batch][name]["same_tokens_as_ours"] = token_agreement(out[batch], outputs["ours"][batch])

    print(
        f"\n{args.clip_s:.0f} s clips, {args.new_tokens} new tokens, card {card(device)}, peak {peak_gb(device):.1f} GB"
    )
    names = [n for n in named if n not in errors]
    # The ratios are of our fastest path at the largest batch, the one the JSON reports.
    largest = max(rows)
    best = max((n for n in rows[largest] if n.startswith("ours")), key=lambda n: rows[largest][n]["rtfx"])
    print(f"{'batch':>6}" + "".join(f"{'RTFx ' + n:>21}" for n in names) + f"{'x generate':>12}{'x NeMo':>9}")
    for batch, row in rows.items():
        line = f"{batch:>6}" + "".join(
            f"{row[n]['rtfx']:>21.0f}" if n in row else f"{'-':>21}" for n in names
        )
        line += (
            f"{row[best]['rtfx'] / row['generate']['rtfx']:>12.2f}"
            if {best, "generate"} <= row.keys()
            else f"{'-':>12}"
        )
        line += (
            f"{row[best]['rtfx'] / row['nemo']['rtfx']:>9.2f}"
            if {best, "nemo"} <= row.keys()
            else f"{'-':>9}"
        )
        print(line)
    print(f"x generate, x NeMo: {best}")

    if args.serve_load:
        del ours, nemo, named
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        served = run_serve_load(args, Path(tempfile.mkdtemp()) / "serve_load.json")
        print(f"served over HTTP: {json.dumps(served)}", flush=True)

    top = rows[largest]
    write_result(
        "serve_throughput" + ("_tiny" if args.tiny else ""),
        {
            "card": card(device),
            "batch_size": largest,
            "best_path": best,
            "rtfx": top[best]["rtfx"],
            "ratio_vs_generate": top[best]["rtfx"] / top["generate"]["rtfx"] if "generate" in top else None,
            "ratio_vs_nemo": top[best]["rtfx"] / top["nemo"]["rtfx"] if "nemo" in top else None,
            "clip_s": args.clip_s,
            "new_tokens": args.new_tokens,
            "by_batch_size": {str(b): r for b, r in rows.items()},
            "errors": errors,
            "p99_s_at_64": served["64"]["p99_s"] if served and "64" in served else None,
            "served_by_concurrency": served,
            "served_from": str(args.served_from) if args.served_from else None,
        },
        args.out,
        record=not args.tiny,
    )


if __name__ == "__main__":
    main()
