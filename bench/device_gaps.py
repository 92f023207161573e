"""Where the GPU waits for the host: its idle gaps in a profiled pass, charged to what the host was doing.

``torch.profiler`` gives the GPU's busy time (``bench/train_throughput.py --profile``); a step is
host-bound when the wall is longer. This module says *where* the GPU sat idle: every gap between
two kernels is charged to

- the step's phase the main thread was in at the gap (``record_function`` names such as
  ``PHASES``; "between phases" outside them), and
- the host op that launched the kernel ending the gap: the GPU waited for that launch. It is the
  outermost op above the launch on its thread, below a phase annotation (in the backward, on the
  autograd thread, the autograd node, e.g. ``AccumulateGrad``).

The kernel -> launch link is the CUDA correlation id: a kernel event and its runtime event
(``cudaLaunchKernel``, ``cuLaunchKernelEx``, ``cudaMemcpyAsync``) share ``id``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

# record_function names the benchmark's steps use for their phases (in order).
PHASES = ("step:forward", "step:backward", "step:optimizer")
AUTOGRAD_NODE = "autograd::engine::evaluate_function: "


@dataclass(frozen=True)
class Gap:
    """One stretch of GPU idle time, in microseconds, and whom it is charged to."""

    idle_us: float
    phase: str
    launcher: str


def _is_kernel(event) -> bool:
    # As profile_pass counts kernels: device events that are not user annotations mirrored on the device.
    return (
        str(event.device_type).endswith("CUDA")
        and not getattr(event, "is_user_annotation", False)
        and "#" not in event.name
    )


def _launcher(runtime_event, phase_names: tuple[str, ...]) -> str:
    """The outermost op above a runtime launch event, stopping below a phase annotation."""
    if runtime_event is None:
        return "(launch not found)"
    chain = []
    event = runtime_event.cpu_parent
    while event is not None and event.name not in phase_names:
        chain.append(event.name)
        event = event.cpu_parent
    if not chain:
        return runtime_event.name
    for name in reversed(chain):  # on the autograd thread the node names the work
        if name.startswith(AUTOGRAD_NODE):
            return "backward node " + name[len(AUTOGRAD_NODE) :]
    return chain[-1]


def idle_gaps(events: list, phase_names: tuple[str, ...] = PHASES, min_gap_us: float = 2.0) -> list[Gap]:
    """The GPU's idle gaps between consecutive kernels in ``events`` (``prof.events()``), charged
    to a phase and a launching host op. Gaps shorter than ``min_gap_us`` are launch latency, not waiting.
    """
    kernels = sorted((e for e in events if _is_kernel(e)), key=lambda e: e.time_range.start)
    host = [e for e in events if not str(e.device_type).endswith("CUDA")]
    runtime_by_id = {e.id: e for e in host if e.name.startswith("cu")}
    phases = sorted(
        ((e.time_range.start, e.time_range.end, e.name) for e in host if e.name in phase_names),
    )
    gaps = []
    busy_until = None
    for kernel in kernels:
        start, end = kernel.time_range.start, kernel.time_range.end
        if busy_until is not None and start - busy_until >= min_gap_us:
            middle = (start + busy_until) / 2
            phase = next((name for lo, hi, name in phases if lo <= middle <= hi), "between phases")
            gaps.append(Gap(start - busy_until, phase, _launcher(runtime_by_id.get(kernel.id), phase_names)))
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def gap_table(gaps: list[Gap], wall_s: float, rows: int = 20) -> str:
    """Idle seconds per phase, then the launchers the GPU waited on longest, as aligned text."""
    total_s = sum(g.idle_us for g in gaps) / 1e6
    by_phase: dict[str, list[float]] = defaultdict(list)
    by_launcher: dict[tuple[str, str], list[float]] = defaultdict(list)
    for gap in gaps:
        by_phase[gap.phase].append(gap.idle_us)
        by_launcher[(gap.phase, gap.launcher)].append(gap.idle_us)
    lines = [f"GPU idle between kernels: {total_s:.3f} s of a {wall_s:.3f} s profiled pass, {len(gaps)} gaps"]
    lines.append(f"{'phase':<24}{'gaps':>8}{'idle s':>9}{'share':>8}")
    for phase, idle in sorted(by_phase.items(), key=lambda kv: -sum(kv[1])):
        lines.append(
            f"{phase:<24}{len(idle):>8}{sum(idle) / 1e6:>9.3f}{sum(idle) / 1e6 / max(total_s, 1e-9):>8.1%}"
        )
    lines.append(
        f"\n{'phase':<18}{'the GPU waited for (launching host op)':<62}{'gaps':>7}{'idle ms':>9}{'us/gap':>8}"
    )
    top = sorted(by_launcher.items(), key=lambda kv: -sum(kv[1]))[:rows]
    for (phase, launcher), idle in top:
        ms = sum(idle) / 1e3
        lines.append(f"{phase:<18}{launcher[:60]:<62}{len(idle):>7}{ms:>9.1f}{1e3 * ms / len(idle):>8.0f}")
    return "\n".join(lines)


def idle_summary(gaps: list[Gap]) -> dict[str, float]:
    """Idle seconds per phase (for the JSON)."""
    totals: dict[str, float] = defaultdict(float)
    for gap in gaps:
        totals[gap.phase] += gap.idle_us / 1e6
    return {phase: round(seconds, 4) for phase, seconds in sorted(totals.items(), key=lambda kv: -kv[1])}
