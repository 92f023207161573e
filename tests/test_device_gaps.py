"""``bench/device_gaps.py`` charges the GPU's idle gaps to the step phase and the launching host op."""

from types import SimpleNamespace

from torch.autograd import DeviceType

from bench.device_gaps import gap_table, idle_gaps, idle_summary


def event(name: str, start: float, end: float, device=DeviceType.CPU, id: int = 0, parent=None):
    return SimpleNamespace(
        name=name,
        time_range=SimpleNamespace(start=start, end=end),
        device_type=device,
        id=id,
        cpu_parent=parent,
        is_user_annotation=False,
    )


def test_gaps_are_charged_to_phase_and_launcher() -> None:
    forward = event("step:forward", 0, 100)
    linear = event("aten::linear", 1, 5, parent=forward)
    launch_linear = event("cudaLaunchKernel", 2, 3, id=11, parent=linear)
    compiled = event("Torch-Compiled Region: 0/1", 40, 60, parent=forward)
    inner = event("CompiledFunction", 41, 59, parent=compiled)
    launch_fused = event("cuLaunchKernelEx", 55, 56, id=12, parent=inner)
    backward = event("step:backward", 100, 200)
    node = event("autograd::engine::evaluate_function: AccumulateGrad", 150, 170)
    copy = event("aten::copy_", 151, 169, parent=node)
    launch_copy = event("cudaMemcpyAsync", 160, 161, id=13, parent=copy)
    kernels = [
        event("gemm", 3, 30, DeviceType.CUDA, id=11),  # first kernel: no gap before it
        event("triton_fused", 56, 70, DeviceType.CUDA, id=12),  # 26 us idle, in the forward
        event("Memcpy DtoD", 162, 165, DeviceType.CUDA, id=13),  # 92 us idle, in the backward
        event("Optimizer.step#AdamW.step", 165, 180, DeviceType.CUDA, id=99),  # annotation: not a kernel
    ]
    host = [forward, linear, launch_linear, compiled, inner, launch_fused, backward, node, copy, launch_copy]
    gaps = idle_gaps(host + kernels)

    assert [(g.phase, g.launcher, g.idle_us) for g in gaps] == [
        ("step:forward", "Torch-Compiled Region: 0/1", 26),
        ("step:backward", "backward node AccumulateGrad", 92),
    ]
    assert idle_summary(gaps) == {"step:backward": 0.0001, "step:forward": 0.0}
    table = gap_table(gaps, wall_s=0.0002)
    assert "2 gaps" in table and "backward node AccumulateGrad" in table


def test_overlapping_kernels_leave_no_gap_and_short_gaps_are_launch_latency() -> None:
    kernels = [
        event("a", 0, 50, DeviceType.CUDA, id=1),
        event("b", 10, 20, DeviceType.CUDA, id=2),  # inside a (another stream): a still busy until 50
        event("c", 51, 60, DeviceType.CUDA, id=3),  # 1 us after a: launch latency
        event("d", 80, 90, DeviceType.CUDA, id=4),
    ]
    gaps = idle_gaps(kernels)
    assert [(g.idle_us, g.phase, g.launcher) for g in gaps] == [(20, "between phases", "(launch not found)")]
