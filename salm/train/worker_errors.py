"""Errors raised in a Ray Train worker, in a form Ray can send back to the driver.

Why: Ray Train pickles the exception a worker raises to report it. Some exceptions hold objects
that do not pickle: torch's ``InductorError`` keeps the frame it was raised in, whose locals reach
DeepSpeed's process group. Ray then reports only "cannot pickle 'ProcessGroup' object" and the real
error (for example Inductor refusing to compile a layer) is lost. ``sendable_errors`` turns such an
exception into a ``WorkerError`` that carries the original's type, message and traceback as text.
Exceptions that pickle pass through unchanged, so their types stay catchable on the driver.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from ray import cloudpickle

Params = ParamSpec("Params")
Result = TypeVar("Result")


class WorkerError(RuntimeError):
    """A Ray Train worker's exception that Ray could not send back, as text."""


def sendable_errors(function: Callable[Params, Result]) -> Callable[Params, Result]:
    """``function``, with exceptions that do not pickle re-raised as a ``WorkerError`` with their traceback."""

    @functools.wraps(function)
    def wrapper(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if pickles(error):
                raise
            raise WorkerError(
                f"{type(error).__name__} in the training worker (its traceback, as Ray could not send the "
                f"exception itself):\n{traceback.format_exc()}"
            ) from None

    return wrapper


def pickles(error: BaseException) -> bool:
    """Whether Ray can serialise ``error`` (it uses cloudpickle)."""
    try:
        cloudpickle.dumps(error)
    except Exception:  # noqa: BLE001 - any failure to serialise means Ray could not send it either
        return False
    return True
