"""A training worker's exception reaches the driver with its message, even one that does not pickle."""

from __future__ import annotations

import pickle
import sys

import pytest

from salm.train.worker_errors import WorkerError, sendable_errors


class ProcessGroup:
    """Stands for DeepSpeed's process group, which torch's ``InductorError`` reaches through its frame."""

    def __reduce__(self) -> tuple:
        raise TypeError("cannot pickle 'ProcessGroup' object")


class CompileFailure(RuntimeError):
    """Like torch's ``InductorError``: it keeps an object that does not pickle."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.held = ProcessGroup()


@sendable_errors
def fails_to_compile(config: dict) -> None:
    raise CompileFailure(f"layer {config['layer']} did not compile")


@sendable_errors
def refuses_a_value(config: dict) -> None:
    raise ValueError(f"bad value {config['value']}")


def test_an_exception_that_does_not_pickle_is_sent_as_its_traceback() -> None:
    with pytest.raises(WorkerError) as raised:
        fails_to_compile({"layer": 7})
    text = str(raised.value)
    assert "CompileFailure" in text and "layer 7 did not compile" in text and "fails_to_compile" in text
    assert str(pickle.loads(pickle.dumps(raised.value))) == text


def test_an_exception_that_pickles_keeps_its_type() -> None:
    with pytest.raises(ValueError, match="bad value 3") as raised:
        refuses_a_value({"value": 3})
    assert type(raised.value) is ValueError


def test_ray_train_reports_the_workers_message_not_a_serialisation_error(ray_local, tmp_path) -> None:
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests

    trainer = TorchTrainer(
        fails_to_compile,
        train_loop_config={"layer": 7},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="worker_errors", storage_path=str(tmp_path)),
    )
    with pytest.raises(Exception) as raised:
        trainer.fit()
    text = str(raised.value)
    assert "layer 7 did not compile" in text and "CompileFailure" in text
    assert "cannot pickle" not in text
