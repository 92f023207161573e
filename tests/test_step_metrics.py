"""The training loop's per-interval metrics: the model's rates count the steps' own time, and
``data_wait_share`` says how much of the wall went to waiting for the data pipeline."""

import pytest
import torch

from salm.train.step_metrics import GAUGES, StepMeter


def micro_batch_output(positions: int) -> dict:
    return {
        "loss": torch.tensor(2.0),
        "num_positions": torch.tensor(positions),
        "padded_positions": positions,
    }


def test_the_wait_for_data_is_a_share_of_the_wall_and_not_in_the_rates(ray_local) -> None:
    meter = StepMeter(run_name="wait", world_size=2)
    meter.add(micro_batch_output(100), audio_seconds=30.0, seconds=3.0, data_wait_seconds=1.0)
    meter.add(micro_batch_output(100), audio_seconds=30.0, seconds=1.0, data_wait_seconds=3.0)
    metrics = meter.flush(step=2, lr=1e-3, grad_norm=0.5)
    assert metrics["data_wait_share"] == pytest.approx(0.5)  # 4 s of 8 s waiting for batches
    assert metrics["audio_s_per_s"] == pytest.approx(60.0 / 4.0 * 2)  # the steps' 4 s, both workers
    assert metrics["step_time_s"] == pytest.approx(2.0)
    assert set(GAUGES) <= set(metrics)  # every gauge is set from the flushed values
    assert "data wait 50%" in StepMeter.describe(metrics, max_steps=10)


def test_a_loop_that_never_waits_reports_no_wait(ray_local) -> None:
    meter = StepMeter(run_name="no-wait", world_size=1)
    meter.add(micro_batch_output(10), audio_seconds=5.0, seconds=1.0)
    assert meter.flush(step=1, lr=1e-3, grad_norm=None)["data_wait_share"] == 0.0
