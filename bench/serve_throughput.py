"""Batched transcription speed (RTFx) of 10 s clips: our generate vs transformers' vs NeMo's SALM.

Same model (canary-qwen-2.5b shapes, random weights, bf16, eval) and the same clips through:

- ours: ``SALM.generate`` (greedy: static KV cache, one CUDA graph replay per token);
- generate: plain ``transformers`` ``generate`` on the same LLM and the same input embeddings
  (what ``SALM.generate`` did before the static decoder);
- nemo: NeMo 3.0's ``SALM.generate`` with our weights loaded.

Every path makes exactly ``--new-tokens`` tokens: the EOS row of the tied embedding / LM head is
zeroed, so with random weights EOS never wins the argmax (a real model stops at its own EOS).
RTFx = audio seconds / wall seconds of one call (prompt encoding, encoder, prefill, decoding,
detokenising), median of ``--repeats`` calls after one warm-up call per batch size. Run::

    PYTHONPATH=$HOME/site:$PWD python3 -m bench.serve_throughput --out $OUT

``--tiny`` runs the tiny recipe on CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

from bench.common import PROMPT, card, peak_gb, recipe, timed, write_llm_dir, write_result
from salm.model.llm import base_causal_lm, embedding_inside

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
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = recipe(write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=args.tiny), tiny=args.tiny)
    ours, nemo = build_models(cfg, device, with_nemo=not args.skip_nemo)
    named = paths(ours, nemo, args.new_tokens)
    print(f"card: {card(device)}", flush=True)

    generator = torch.Generator().manual_seed(0)
    rows: dict[int, dict] = {}
    for batch in args.batch_sizes:
        audios = 0.1 * torch.randn(batch, int(args.clip_s * SAMPLE_RATE), generator=generator)
        lens = torch.full((batch,), audios.shape[1])
        audios, lens = audios.to(device), lens.to(device)
        row, outputs = {}, {}
        for name, fn in named.items():
            outputs[name] = fn(audios, lens)  # warm-up (ours: captures the graph for this batch size)
            times = sorted(
                timed(lambda fn=fn, a=audios, n=lens: fn(a, n), device) for _ in range(args.repeats)
            )
            seconds = times[len(times) // 2]
            row[name] = {"seconds": seconds, "rtfx": batch * args.clip_s / seconds}
            print(f"B={batch:<4} {name:<9} {seconds:7.3f} s  RTFx {row[name]['rtfx']:8.0f}", flush=True)
        lengths = {name: len(ids[0]) for name, ids in outputs.items()}
        assert all(n == args.new_tokens for n in lengths.values()), f"tokens made per path: {lengths}"
        # bf16 kernels differ between paths (mask layout, cache shapes): near-ties in the argmax can flip.
        row["same_tokens_as_generate"] = sum(
            a == b
            for x, y in zip(outputs["ours"], outputs["generate"], strict=True)
            for a, b in zip(x, y, strict=True)
        ) / (batch * args.new_tokens)
        rows[batch] = row

    print(
        f"\n{args.clip_s:.0f} s clips, {args.new_tokens} new tokens, card {card(device)}, peak {peak_gb(device):.1f} GB"
    )
    names = list(named)
    print(
        f"{'batch':>6}"
        + "".join(f"{'RTFx ' + n:>15}" for n in names)
        + f"{'x generate':>12}{'x NeMo':>9}{'same tok':>10}"
    )
    for batch, row in rows.items():
        line = f"{batch:>6}" + "".join(f"{row[n]['rtfx']:>15.0f}" for n in names)
        line += f"{row['ours']['rtfx'] / row['generate']['rtfx']:>12.2f}"
        line += f"{row['ours']['rtfx'] / row['nemo']['rtfx']:>9.2f}" if "nemo" in row else f"{'-':>9}"
        print(line + f"{row['same_tokens_as_generate']:>10.1%}")

    largest = max(rows)
    write_result(
        "serve_throughput" + ("_tiny" if args.tiny else ""),
        {
            "card": card(device),
            "batch_size": largest,
            "rtfx": rows[largest]["ours"]["rtfx"],
            "ratio_vs_generate": rows[largest]["ours"]["rtfx"] / rows[largest]["generate"]["rtfx"],
            "ratio_vs_nemo": rows[largest]["ours"]["rtfx"] / rows[largest]["nemo"]["rtfx"] if nemo else None,
            "clip_s": args.clip_s,
            "new_tokens": args.new_tokens,
            "by_batch_size": {str(b): r for b, r in rows.items()},
            "serve_p99": "not measured: Ray Serve load test not run in this benchmark",
        },
        args.out,
    )


if __name__ == "__main__":
    main()
