"""The LLM's attention kernels at Qwen3-1.7B shapes (16 query heads, 8 key/value heads of 128), GPU only.

Decoding (one query per row over a static cache of ``L`` slots, with the decoder's float mask) and
prefill (150 prompt positions), every variant timed in the same run as CUDA-graph replays:

- ``transformers_pack_gqa``: what transformers' ``sdpa`` runs for one eager query with a mask
  (the query groups packed onto the key/value heads, ``pack_gqa``); the baseline;
- ``transformers_repeat_kv``: what it runs under ``torch.compile`` or for several queries with a
  mask (keys and values copied per query group, ``repeat_kv``);
- ``kv_heads``: ``sdpa_on_kv_heads``, what our greedy decoder runs (``enable_gqa=True`` with the mask);
- ``pack_cudnn`` / ``pack_efficient`` / ``pack_math``: the baseline forced onto one SDPA backend;
- ``manual`` / ``manual_compiled``: matmul-softmax-matmul, eager and ``torch.compile``'d.

Prints microseconds per call and ``kv_heads`` against the baseline::

    python3 -m bench.decode_attention
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPE = torch.bfloat16
KV_HEADS, GROUPS, HEAD_DIM = 8, 2, 128


def microseconds(fn, replays: int = 50, calls_per_graph: int = 10) -> float | str:
    """Mean time of one ``fn()`` inside a replayed CUDA graph (no launch overhead), or why it failed."""
    try:
        fn()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls_per_graph):
                fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return round(start.elapsed_time(end) * 1000 / (replays * calls_per_graph), 1)
    except Exception as error:  # a backend that refuses these shapes: say so, keep the others
        return f"failed: {type(error).__name__}"


def manual(query, key, value, mask):
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5) + mask
    return torch.matmul(torch.softmax(scores.float(), -1).to(query.dtype), value)


def decode_row(batch: int, slots: int) -> dict:
    packed_query = torch.randn(batch, KV_HEADS, GROUPS, HEAD_DIM, device="cuda", dtype=DTYPE)
    query = packed_query.reshape(batch, KV_HEADS * GROUPS, 1, HEAD_DIM)
    key = torch.randn(batch, KV_HEADS, slots, HEAD_DIM, device="cuda", dtype=DTYPE)
    value = torch.randn_like(key)
    mask = torch.zeros(batch, 1, 1, slots, device="cuda", dtype=DTYPE)
    mask[..., slots - 40 :] = torch.finfo(DTYPE).min  # the slots not written yet
    repeated = (
        key[:, :, None].expand(batch, KV_HEADS, GROUPS, slots, HEAD_DIM).reshape(batch, -1, slots, HEAD_DIM)
    )
    compiled = torch.compile(manual, dynamic=False)

    def on_backend(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(packed_query, key, value, attn_mask=mask)

        return run

    return {
        "transformers_pack_gqa": microseconds(
            lambda: F.scaled_dot_product_attention(packed_query, key, value, attn_mask=mask)
        ),
        "transformers_repeat_kv": microseconds(
            lambda: F.scaled_dot_product_attention(query, repeated, repeated, attn_mask=mask)
        ),
        "kv_heads": microseconds(
            lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
        ),
        "pack_cudnn": microseconds(on_backend(SDPBackend.CUDNN_ATTENTION)),
        "pack_efficient": microseconds(on_backend(SDPBackend.EFFICIENT_ATTENTION)),
        "pack_math": microseconds(on_backend(SDPBackend.MATH)),
        "manual": microseconds(lambda: manual(packed_query, key, value, mask)),
        "manual_compiled": microseconds(lambda: compiled(packed_query, key, value, mask)),
    }


def prefill_row(batch: int, positions: int = 150, slots: int = 256) -> dict:
    query = torch.randn(batch, KV_HEADS * GROUPS, positions, HEAD_DIM, device="cuda", dtype=DTYPE)
    key = torch.randn(batch, KV_HEADS, slots, HEAD_DIM, device="cuda", dtype=DTYPE)
    value = torch.randn_like(key)
    blocked = torch.finfo(DTYPE).min
    mask = torch.full((batch, 1, positions, slots), blocked, device="cuda", dtype=DTYPE)
    mask[..., :positions] = torch.full((positions, positions), blocked, device="cuda", dtype=DTYPE).triu(1)

    repeated_key = (
        key[:, :, None].expand(batch, KV_HEADS, GROUPS, slots, HEAD_DIM).reshape(batch, -1, slots, HEAD_DIM)
    )
    repeated_value = repeated_key.clone()
    return {
        "transformers_repeat_kv": microseconds(  # attention alone; the copies are timed apart
            lambda: F.scaled_dot_product_attention(query, repeated_key, repeated_value, attn_mask=mask), 10
        ),
        "repeat_copy_of_one": microseconds(  # transformers makes two per layer (keys and values)
            lambda: (
                key[:, :, None]
                .expand(batch, KV_HEADS, GROUPS, slots, HEAD_DIM)
                .reshape(batch, -1, slots, HEAD_DIM)
            ),
            10,
        ),
        "kv_heads": microseconds(
            lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True), 10
        ),
    }


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/decode_attention.py times CUDA kernels: run it on a GPU machine (BENCHMARKS.md)"
        )
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for batch in (16, 64, 256):
        for slots in (192, 256):
            row = decode_row(batch, slots)
            ratio = row["transformers_pack_gqa"] / row["kv_heads"]
            print(
                f"decode  B={batch:<4} L={slots}: {row}  kv_heads x{ratio:.2f} faster than pack_gqa",
                flush=True,
            )
    for batch in (64, 256):
        row = prefill_row(batch)
        ratio = (row["transformers_repeat_kv"] + 2 * row["repeat_copy_of_one"]) / row["kv_heads"]
        print(f"prefill B={batch:<4} T=150 L=256: {row}  kv_heads x{ratio:.2f} (copies included)", flush=True)


if __name__ == "__main__":
    main()
