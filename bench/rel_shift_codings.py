"""Three codings of the Conformer's relative-position shift, compiled as the recipe compiles (GPU).

Forward + backward of the canary recipe's FastConformer (``--layers`` deep, bf16, training mode)
over the five duration buckets of ``bench/train_throughput.py``, each layer compiled with
``dynamic=True`` and the canary recipe's Inductor options (``cpp_wrapper``), one coding at a time:

- ``view_break``: the strided view with its offset from ``storage_offset()`` (the recipe's until
  2026-12-03): Dynamo cannot trace that int, so it breaks the graph and the layer runs as several graphs;
- ``view``: ``salm.model.rel_shift.strided_rel_shift``, the same view with its offset taken by
  slicing a flat view: no break, one graph, but the view's backward is an ``as_strided_scatter``
  inside the compiled graph;
- ``gather``: a gather over an iota index whose backward is the opposite gather: no break, no
  scatter (one pointwise kernel each way).

All three are NeMo's shift on the key columns (float64 check at start). Prints ms per pass, Dynamo's
graph and break counts, and one profiled pass per coding (``train_throughput``'s ``profile_pass``:
host ops, GPU time by kernel kind, top kernels, idle gaps)::

    python3 -m bench.rel_shift_codings --layers 4
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path

import torch

from bench.common import card
from bench.encoder_attention import buckets, encoder, pass_ms, train_step
from bench.train_throughput import profile_pass
from salm.model import rel_shift
from salm.model.compile import compile_layers


def view_with_break(scores: torch.Tensor) -> torch.Tensor:
    """The recipe's view before it took its offset by slicing: ``storage_offset()`` breaks the graph."""
    batch, heads, time, positions = scores.shape
    scores = scores.contiguous()
    return scores.as_strided(
        (batch, heads, time, positions - time + 1),
        (heads * time * positions, time * positions, positions - 1, 1),
        scores.storage_offset() + time - 1,
    )


class GatheredShift(torch.autograd.Function):
    """``shifted[..., i, j] = scores[..., i, j + T - 1 - i]`` as a gather; its gradient is the opposite gather."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        batch, heads, time, positions = scores.shape
        width = positions - time + 1
        ctx.positions = positions
        rows = torch.arange(time, device=scores.device)[:, None]
        columns = torch.arange(width, device=scores.device)[None, :] + (time - 1) - rows
        return torch.gather(scores, 3, columns.expand(batch, heads, time, width))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        batch, heads, time, width = grad.shape
        rows = torch.arange(time, device=grad.device)[:, None]
        keys = torch.arange(ctx.positions, device=grad.device)[None, :] - (time - 1) + rows
        valid = (keys >= 0) & (keys < width)
        gathered = torch.gather(grad, 3, keys.clamp(0, width - 1).expand(batch, heads, time, ctx.positions))
        return gathered.masked_fill(~valid, 0)


CODINGS = {
    "view_break": view_with_break,
    "view": rel_shift.strided_rel_shift,
    "gather": GatheredShift.apply,
}


def check_codings() -> None:
    """Every coding gives NeMo's shift and its gradient (float64, CPU)."""
    from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention

    for time, positions in [(1, 1), (7, 13), (3, 9)]:
        scores = torch.randn(2, 3, time, positions, dtype=torch.float64, requires_grad=True)
        reference = RelPositionMultiHeadAttention.rel_shift(None, scores)[..., : positions - time + 1]
        grad = torch.randn_like(reference)
        (expected,) = torch.autograd.grad(reference, scores, grad)
        for name, shift in CODINGS.items():
            shifted = shift(scores)
            (got,) = torch.autograd.grad(shifted, scores, grad)
            if not (torch.equal(shifted, reference) and torch.equal(got, expected)):
                raise AssertionError(f"{name} is not NeMo's shift at T={time}, P={positions}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=640.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codings", nargs="+", default=list(CODINGS), choices=list(CODINGS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "rel_shift_codings times compiled CUDA kernels: run it on the GPU machine (BENCHMARKS.md)"
        )
    from torch._dynamo.utils import counters

    check_codings()
    device = torch.device("cuda")
    base = encoder(args.layers, device)
    batches = buckets(args.budget_s, device)
    rows = {}
    for name in args.codings:
        rel_shift.strided_rel_shift = CODINGS[name]  # what StridedRelPositionAttention.rel_shift calls
        model = copy.deepcopy(base)
        rel_shift.use_strided_rel_shift(model)
        torch._dynamo.reset()
        counters.clear()
        compile_layers(list(model.layers), {"cpp_wrapper": True})
        ms = pass_ms(model, batches, device, args.repeats)
        rows[name] = {
            "ms_per_pass": ms,
            "graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"],
        }
        print(
            f"{name}: {ms:.1f} ms per pass; {rows[name]['graphs']} graphs, {rows[name]['graph_breaks']} breaks",
            flush=True,
        )
        profiled = profile_pass(functools.partial(train_step, model), batches, device)
        rows[name]["profile"] = {k: v for k, v in profiled.items() if k != "top_host_ops"}
        del model
    first = args.codings[0]
    print(
        f"\n{card(device)}; {args.layers} Conformer layers, 5 buckets of {args.budget_s:.0f} audio s, fwd+bwd"
    )
    for name, row in rows.items():
        print(
            f"{name:<12}{row['ms_per_pass']:>9.1f} ms{rows[first]['ms_per_pass'] / row['ms_per_pass']:>8.2f}x {first}"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rel_shift_codings.json").write_text(
            json.dumps({"card": card(device), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
