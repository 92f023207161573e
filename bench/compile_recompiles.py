"""How often ``trainer.compile_layers`` compiles a Conformer layer as the frame count changes (CPU or GPU).

``salm.model.compile`` compiles each Conformer layer with ``dynamic=True`` so that one graph serves
every bucketed batch. This script checks that: it trains (forward + backward) the recipe's encoder,
its layers compiled with ``dynamic=True``, over ``--lengths`` batches that each have a different
frame count, and counts the compiled frames Dynamo produced, three ways in one run:

- Dynamo alone (``backend="eager"``: tracing and guards, no Inductor), the baseline: it shows
  whether a recompile comes from the traced code or from Inductor/AOTAutograd's compile;
- Inductor with torch's own lowering of the convolution backward;
- Inductor after ``keep_conv1d_backward_dynamic()``, as ``compile_repeated_layers`` compiles.

Inductor's and AOTAutograd's caches are off, so no row reuses another's compiled artefacts.

Dynamo stops compiling a code object after ``torch._dynamo.config.recompile_limit`` (8) entries;
later shapes then run that layer eagerly, which the last column reports::

    python3 -m bench.compile_recompiles                # tiny recipe encoder, CPU, ~4 min on 2 cores
    python3 -m bench.compile_recompiles --canary --device cuda

``--salm`` trains the whole tiny SALM instead (CPU, ~10 min on 2 cores): ``compile_repeated_layers``
on its Conformer and Qwen3 layers, over ``--lengths`` bucketed batches as
``bench/train_throughput.py`` makes them (every one a new audio and text length), with torch's
lowering and then with ``keep_conv1d_backward_dynamic``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from tqdm import tqdm

from bench.common import CONFIGS
from salm.model.compile import keep_conv1d_backward_dynamic
from salm.model.rel_shift import use_strided_rel_shift


class LimitWatcher(logging.Handler):
    """Catches Dynamo's "hit config.recompile_limit" warning (it has no counter of its own)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hit = False

    def emit(self, record: logging.LogRecord) -> None:
        self.hit = self.hit or "recompile_limit" in record.getMessage()


BACKEND_NAMES = {
    "eager": "Dynamo only (eager)",
    "inductor": "Inductor, torch's conv lowering",
    "inductor_conv1d_dynamic": "Inductor, compile_layers",
}


@contextmanager
def watching_recompile_limit() -> Iterator[LimitWatcher]:
    """A ``LimitWatcher`` on Dynamo's logger for the ``with`` block."""
    watcher = LimitWatcher()
    logging.getLogger("torch._dynamo").addHandler(watcher)
    try:
        yield watcher
    finally:
        logging.getLogger("torch._dynamo").removeHandler(watcher)


def caches_off() -> ExitStack:
    """Inductor's and AOTAutograd's on-disk caches off, so no row reuses another's artefacts."""
    stack = ExitStack()
    stack.enter_context(inductor_config.patch(fx_graph_cache=False))
    stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
    return stack


def count_compiles(
    backend: str, canary: bool, lengths: list[int], device: torch.device, dtype: torch.dtype
) -> dict:
    """Train the compiled encoder once per frame count; Dynamo's compiled-frame count and limit hits."""
    from salm.model.perception import build_from_target

    if backend == "inductor_conv1d_dynamic":
        replaced = keep_conv1d_backward_dynamic()
        print(f"keep_conv1d_backward_dynamic: {'replaced' if replaced else 'no such lowering in this torch'}")
        backend = "inductor"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    recipe = "salm_canary_qwen_2.5b.yaml" if canary else "tiny.yaml"
    section = OmegaConf.load(CONFIGS / recipe).model.perception.encoder
    torch.manual_seed(0)
    encoder = build_from_target("encoder", section).to(device=device, dtype=dtype).train()
    use_strided_rel_shift(encoder)  # what AudioPerception gives every encoder
    for layer in encoder.layers:
        layer.compile(dynamic=True, backend=backend)
    with watching_recompile_limit() as watcher:
        for frames in lengths:
            mel = frames * 8  # 8x subsampling in both recipes
            features = torch.randn(3, section.feat_in, mel, device=device, dtype=dtype)
            lens = torch.tensor([mel, mel - 80, mel - 320], device=device)
            encoded, _ = encoder(audio_signal=features, length=lens)
            encoded.float().square().mean().backward()
    frames_compiled = torch._dynamo.utils.counters["frames"]["ok"]
    return {"compiled_frames": frames_compiled, "recompile_limit_hit": watcher.hit}


def count_salm_compiles(cfg, keep_dynamic: bool, batches: list[dict]) -> dict:
    """Train the tiny SALM of ``cfg``, compiled as ``trainer.compile_layers`` compiles it, on ``batches``;
    with ``keep_dynamic`` false, without ``keep_conv1d_backward_dynamic`` (torch's lowering)."""
    from salm.model.compile import compile_repeated_layers, repeated_layers
    from salm.train.engine import build_model

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu")).train()
    if keep_dynamic:
        compile_repeated_layers(model)
    else:  # the same compile without its keep_conv1d_backward_dynamic() call
        for layer in repeated_layers(model):
            layer.compile(dynamic=True)
    frames_after = []
    with watching_recompile_limit() as watcher:
        for batch in tqdm(batches, desc="compile_layers" if keep_dynamic else "torch's conv lowering"):
            model.loss(batch)["loss"].backward()
            frames_after.append(torch._dynamo.utils.counters["frames"]["ok"])
    return {
        "compiled_frames": frames_after[-1],
        "frames_after_each_batch": frames_after,
        "recompile_limit_hit": watcher.hit,
    }


def salm_batches(cfg, count: int) -> list[dict]:
    """``count`` bucketed batches of ``cfg``'s tiny recipe, as ``bench/train_throughput.py --tiny`` makes them."""
    from bench.train_batches import build_tokenizer_model, make_batches

    model = build_tokenizer_model(cfg)
    batches: list[dict] = []
    seed = 0
    while len(batches) < count:
        batches += make_batches(model, 6.0, seed, tiny=True)
        seed += 1
    return batches[:count]


def main_salm(args: argparse.Namespace) -> None:
    """``--salm``: the whole tiny SALM on bucketed batches, torch's lowering first (it cannot come back)."""
    from bench.train_throughput import recipe, write_llm_dir

    cfg = recipe(write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=True), tiny=True)
    batches = salm_batches(cfg, max(args.lengths, 2))
    with caches_off():
        rows = {
            "inductor": count_salm_compiles(cfg, False, batches),
            "inductor_conv1d_dynamic": count_salm_compiles(cfg, True, batches),
        }
    shapes = [(tuple(b["audios"].shape), tuple(b["input_ids"].shape)) for b in batches]
    print(f"\ntiny SALM on cpu; {len(batches)} batches (audios, input_ids): {shapes}")
    print(f"{'backend':<34}{'compiled frames':>16}{'recompile limit hit':>21}  frames after each batch")
    for backend, row in rows.items():
        print(
            f"{BACKEND_NAMES[backend]:<34}{row['compiled_frames']:>16}{str(row['recompile_limit_hit']):>21}  {row['frames_after_each_batch']}"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"device": "cpu", "salm": True, "batch_shapes": shapes, "backends": rows}
        (args.out / "compile_recompiles_salm.json").write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--canary", action="store_true", help="canary-qwen-2.5b encoder shapes (for a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, default=10, help="batches, each with a new frame count")
    parser.add_argument("--salm", action="store_true", help="the whole tiny SALM on bucketed batches (CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.salm:
        main_salm(args)
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = [60 + 7 * i for i in range(args.lengths)]  # encoder frames: 60, 67, 74, ...
    with caches_off():  # torch's lowering goes first: keep_conv1d_backward_dynamic() cannot be undone
        rows = {
            backend: count_compiles(backend, args.canary, lengths, device, dtype)
            for backend in ("eager", "inductor", "inductor_conv1d_dynamic")
        }
    print(
        f"\n{'canary' if args.canary else 'tiny'} encoder on {device}, {dtype}; {len(lengths)} frame counts {lengths}"
    )
    print(f"{'backend':<34}{'compiled frames':>16}{'recompile limit hit':>21}")
    for backend, row in rows.items():
        print(
            f"{BACKEND_NAMES[backend]:<34}{row['compiled_frames']:>16}{str(row['recompile_limit_hit']):>21}"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"device": str(device), "canary": args.canary, "frame_counts": lengths, "backends": rows}
        (args.out / "compile_recompiles.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
