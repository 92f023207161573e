"""Where a training step would make the host wait for the GPU, found on the CPU.

A host sync drains the GPU's queue: the host can no longer run ahead of the device, and a
host-bound stretch after it (the compiled Conformer layers' launches, in the forward and the
backward) leaves the GPU idle instead of eating into a lead. The H200 profile counted 93 syncs per
five-step pass ("Where the packed recipe step's time goes"). Which code makes them does not depend
on the device: an op whose output size or value the host must read back syncs on CUDA wherever it
runs. This script runs the tiny recipe's step (forward, backward, DeepSpeed's step; ZeRO-2 as the
canary recipe, packed LLM sequences or not) on the CPU under a dispatch mode that records each
such op with the line of Python that called it:

- ``_local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``;
- ``nonzero``, ``masked_select``, ``repeat_interleave`` without ``output_size``, ``unique``;
- indexing or ``index_put`` with a boolean mask (``x[mask]``; its backward too), which calls
  ``nonzero`` inside the kernel, out of the dispatch mode's sight;
- ``Tensor.tolist``, ``.cpu``, ``.numpy`` calls (on a CUDA tensor, a copy to the host);
- DeepSpeed's ``get_accelerator().synchronize()`` (a no-op on the CPU accelerator, a device-wide wait
  on CUDA; ZeRO-1/2 calls it with ``overlap_comm``, off in the canary recipe);
- ``torch.tensor(data, device=...)``, ``torch.as_tensor(data, device=...)`` of host data and
  ``Tensor.new_tensor(data)``: host data copied to the device. On CUDA that copy is blocking, from
  pageable memory (a ``cudaStreamSynchronize`` in the profile). On the CPU every device is the CPU,
  so a tensor built with an explicit ``device`` is taken to be built on the training device.

    python3 -m bench.host_syncs [--unpacked] [--device-layout] [--json FILE]

It does not see syncs that only the CUDA path makes, nor a ``.to(device)`` of a host tensor. For those,
``device_sync_sites`` is its GPU side: ``bench/train_throughput.py --profile`` runs one pass of the
real step under torch's CUDA sync debug mode and counts the syncs torch reports by call site.
Reads of tensors that stay on the host in a GPU run too are left out: torch's AdamW keeps its step
counters on the CPU and reads them at every step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import init_single_process_group, recipe, with_canary_training_settings, write_llm_dir
from bench.train_batches import build_tokenizer_model, make_batches

SYNCING_OPS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "repeat_interleave", "_unique2", "unique_dim",
     "unique_consecutive", "equal", "is_nonzero"}
)  # fmt: skip
INDEXING_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
HOST_COPIES = ("tolist", "cpu", "numpy")
HOST_DATA_FACTORIES = ("tensor", "as_tensor")  # torch.<name>(data, device=...): host data to the device


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text under set_sync_debug_mode("warn")
NOT_CALLERS = ("/torch/", "/host_syncs.py", "/warnings.py", "/_py_warnings.py")  # frames call_site skips


def call_site() -> str:
    """``file:line function`` of the innermost caller outside torch, this module and ``warnings``."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not any(part in frame.filename for part in NOT_CALLERS):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "?"


@contextlib.contextmanager
def recorded_sync_warnings() -> Iterator[Counter[str]]:
    """Counts, by call site, every warning torch gives for a synchronizing CUDA operation while active;
    other warnings are shown as before. Torch gives them under ``torch.cuda.set_sync_debug_mode("warn")``,
    at the Python line that called the op (a sync in the backward: the line that ran the backward)."""
    sites: Counter[str] = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None) -> None:
            if SYNC_WARNING in str(message):
                sites[call_site()] += 1
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        yield sites


def device_sync_sites(
    step: Callable[[dict], None], batches: Iterable[dict], device: torch.device
) -> dict[str, int]:
    """One pass of ``step`` over ``batches`` on a CUDA ``device`` under torch's sync debug mode: the syncs
    torch's CUDA code makes (``.item()``, blocking copies, ``nonzero``), counted by call site, most first.
    A sync inside a library (cuDNN, NCCL) is not reported: the profiler's count minus these is theirs."""
    torch.cuda.synchronize(device)
    with recorded_sync_warnings() as sites:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches:
                step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return dict(sites.most_common())


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class SyncSites(TorchDispatchMode):
    """Counts ``(op, call site)`` of every op that would wait for a GPU, while active.

    ``host_resident``: tensors that live on the host in a GPU run too (reading them waits for nothing).
    Also wraps ``Tensor.tolist/cpu/numpy`` (they do not pass through dispatch on the CPU), the
    factories that copy host data to a device (``torch.tensor``/``torch.as_tensor`` with a ``device``,
    ``Tensor.new_tensor``) and DeepSpeed's accelerator's ``synchronize`` for its lifetime, and restores
    them on exit.
    """

    def __init__(self, host_resident: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.host_resident = {id(tensor) for tensor in host_resident}
        self.sites: Counter[tuple[str, str]] = Counter()
        self._originals: dict[tuple[object, str], object] = {}  # (torch or torch.Tensor, name): what it was

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense" and id(args[0]) in self.host_resident:
            pass
        elif name in SYNCING_OPS:
            self.sites[(name, call_site())] += 1
        elif name in INDEXING_OPS and _has_bool_index(args):
            self.sites[(f"{name} with a boolean mask", call_site())] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        self._accelerator, self._accelerator_sync = accelerator, vars(accelerator).get("synchronize")

        def counted_synchronize(*args, _original=accelerator.synchronize, **kwargs):
            self.sites[("accelerator.synchronize", call_site())] += 1
            return _original(*args, **kwargs)

        accelerator.synchronize = counted_synchronize
        for method in HOST_COPIES:
            self._originals[(torch.Tensor, method)] = original = getattr(torch.Tensor, method)

            def counted(tensor, *args, _original=original, _method=method, **kwargs):
                self.sites[(f"Tensor.{_method}", call_site())] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, counted)
        for name in HOST_DATA_FACTORIES:
            self._originals[(torch, name)] = original = getattr(torch, name)

            def counted_factory(data, *args, _original=original, _name=name, **kwargs):
                if kwargs.get("device") is not None and not torch.is_tensor(data):
                    self.sites[(f"torch.{_name}(host data, device=...)", call_site())] += 1
                return _original(data, *args, **kwargs)

            setattr(torch, name, counted_factory)
        self._originals[(torch.Tensor, "new_tensor")] = new_tensor = torch.Tensor.new_tensor

        def counted_new_tensor(tensor, data, *args, **kwargs):
            if id(tensor) not in self.host_resident and not torch.is_tensor(data):
                self.sites[("Tensor.new_tensor(host data)", call_site())] += 1
            return new_tensor(tensor, data, *args, **kwargs)

        torch.Tensor.new_tensor = counted_new_tensor
        return super().__enter__()

    def __exit__(self, *exc):
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)
        if self._accelerator_sync is None:
            del self._accelerator.synchronize  # the class's method again
        else:
            self._accelerator.synchronize = self._accelerator_sync
        return super().__exit__(*exc)


def step_sync_sites(packed: bool, llm_dir: Path, host_layout: bool = True) -> dict[str, list[dict]]:
    """Sync sites of one training step of the tiny recipe under the canary recipe's DeepSpeed
    settings (ZeRO-2, bf16), by phase, after one untraced step. ``host_layout``: the batch carries
    its host-side ``BatchLayout``, as the training loop's do."""
    from salm.train.batch_device import with_layouts
    from salm.train.engine import build_model, wrap_in_deepspeed

    cfg = with_canary_training_settings(recipe(llm_dir, tiny=True))
    init_single_process_group()  # as in a Ray Train worker: NeMo's encoder acts on it
    engine, _ = wrap_in_deepspeed(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    engine.module.salm.pack_llm_sequences = packed
    batches = make_batches(build_tokenizer_model(cfg), 12.0, 3, tiny=True)[:1]
    batch = next(with_layouts(batches, engine.module.salm)) if host_layout else batches[0]
    loss = engine(batch)["loss"]
    engine.backward(loss)
    engine.step()
    adamw = engine.optimizer.optimizer  # torch's, inside DeepSpeed's; its step counters stay on the CPU
    step_counters = [state["step"] for state in adamw.state.values() if torch.is_tensor(state.get("step"))]
    phases = {}
    for phase in ("forward", "backward", "step"):
        with SyncSites(host_resident=step_counters) as trace:
            if phase == "forward":
                loss = engine(batch)["loss"]
            elif phase == "backward":
                engine.backward(loss)
            else:
                engine.step()
        phases[phase] = [
            {"op": op, "site": site, "count": count} for (op, site), count in sorted(trace.sites.items())
        ]
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unpacked", action="store_true", help="padded LLM rows (the recipe packs them)")
    parser.add_argument(
        "--device-layout",
        action="store_true",
        help="no host-side batch layout: the forward finds its indices",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the sites here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        phases = step_sync_sites(
            packed=not args.unpacked,
            llm_dir=write_llm_dir(Path(tmp) / "llm", tiny=True),
            host_layout=not args.device_layout,
        )
    total = 0
    for phase, sites in phases.items():
        count = sum(site["count"] for site in sites)
        total += count
        print(f"{phase}: {count} sync(s)")
        for site in sites:
            print(f"  {site['count']} x {site['op']:<32} {site['site']}")
    print(f"one step: {total} place(s) where a GPU would wait for the host to read a result back")
    if args.json:
        args.json.write_text(json.dumps(phases, indent=2) + "\n")


if __name__ == "__main__":
    main()
