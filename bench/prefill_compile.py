"""The greedy decoder's prefill at Qwen3-1.7B shapes, eager vs. ``compiled_prefill``, in one run (GPU).

Why: serving a batch of 256 ten-second clips spends 0.31 s of 0.71 s in the prefill (H200,
BENCHMARKS.md), the largest phase, and generation runs the LLM eagerly: outside its matmuls an eager
Qwen3 layer over ~36k prompt positions makes many passes over memory (RMSNorm in fp32 as six
kernels, RoPE with ``cat``, SiLU and the gate product, casts, residual adds). This times
``GreedyDecoder.prefill`` on the LLM alone (random weights in bf16, the decoder's attention on the
key/value heads, as ``SALM.generate`` runs it) for prompts of a 10 s clip's length (125 audio frames
and the prompt), eager and compiled, and prints the ratio. Also printed: whether the compiled
prefill picked the eager first token for every row, and how many graphs it compiled over the batch
sizes and a second prompt length (one is the goal: a recompile in a server costs a request minutes).

    python3 -m bench.prefill_compile --out $OUT          # GPU, canary shapes
    python3 -m bench.prefill_compile --tiny --device cpu  # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import card, timed, write_llm_dir, write_result
from salm.model.decoding import GreedyDecoder, attention_on_kv_heads, cache_length, padded_batch_size
from salm.model.llm import load_llm


def prefill_seconds(decoder: GreedyDecoder, embeds, mask, compiled: bool, device, repeats: int) -> float:
    """Median wall seconds of one prefill (after one untimed call, which compiles when ``compiled``)."""
    decoder.prefill(embeds, mask, 0, 0, compiled=compiled)
    times = [
        timed(lambda: decoder.prefill(embeds, mask, 0, 0, compiled=compiled), device) for _ in range(repeats)
    ]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-len", type=int, default=140, help="positions per prompt (10 s clip: ~140)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the tiny test LLM (smoke run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.prompt_len < 9:
        parser.error("--prompt-len must be at least 9 (a second length 7 shorter is timed too)")
    if min(args.batch_sizes) < 1 or args.new_tokens < 1 or args.repeats < 1:
        parser.error("--batch-sizes, --new-tokens and --repeats must be at least 1")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llm = load_llm(write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=args.tiny), False, dtype)
    llm = llm.to(device).eval()
    config = llm.model.config
    per_position_flop = 2 * sum(p.numel() for p in llm.model.layers.parameters())  # the layers' matmuls
    print(f"card: {card(device)}", flush=True)

    from torch._dynamo.utils import counters

    rows, same_first_token, graphs_before = {}, True, counters["stats"]["unique_graphs"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), attention_on_kv_heads(config):
        for batch in args.batch_sizes:
            for length in (args.prompt_len, args.prompt_len - 7):  # the second: no recompile wanted
                max_len = cache_length(length, args.new_tokens)  # as SALM.generate sizes it
                embeds = torch.randn(batch, length, config.hidden_size, generator=generator) * 0.02
                embeds = embeds.to(device, dtype)
                mask = torch.ones(batch, length, dtype=torch.long, device=device)
                decoder = GreedyDecoder(
                    llm.model, llm.lm_head, llm.model.embed_tokens,
                    padded_batch_size(batch, compile_step=True), max_len, args.new_tokens, use_graph=False,
                )  # fmt: skip
                eager_s = prefill_seconds(decoder, embeds, mask, False, device, args.repeats)
                eager_first = decoder.output[:batch, 0].clone()
                compiled_s = prefill_seconds(decoder, embeds, mask, True, device, args.repeats)
                agree = float((decoder.output[:batch, 0] == eager_first).float().mean())
                same_first_token &= agree == 1.0
                tflop = per_position_flop * batch * length / 1e12
                rows[f"{batch}x{length}"] = {
                    "eager_s": eager_s,
                    "compiled_s": compiled_s,
                    "speedup": eager_s / compiled_s,
                    "eager_tflops": tflop / eager_s,
                    "compiled_tflops": tflop / compiled_s,
                    "first_token_agreement": agree,
                }
                print(
                    f"batch {batch} x {length} positions: eager {1000 * eager_s:.1f} ms, compiled "
                    f"{1000 * compiled_s:.1f} ms ({eager_s / compiled_s:.2f}x), layers' matmuls "
                    f"{tflop / eager_s:.0f} -> {tflop / compiled_s:.0f} TFLOP/s, first tokens agree {agree:.3f}",
                    flush=True,
                )
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    print(f"compiled graphs over {len(rows)} shapes: {graphs}; first tokens all agree: {same_first_token}")
    payload = {
        "card": card(device),
        "prompt_len": args.prompt_len,
        "rows": rows,
        "compiled_graphs": graphs,
        "first_tokens_agree": same_first_token,
    }
    write_result("prefill_compile" + ("_tiny" if args.tiny else ""), payload, args.out, record=not args.tiny)


if __name__ == "__main__":
    main()
