"""The SALM model: perception (NeMo preprocessor + FastConformer + adapter + proj) and a PEFT LLM.

``SALM`` and ``GenerationResult`` load on first use: the data pipeline's Ray workers import only
``salm.model.config`` (for the prompt), and importing the model with it (NeMo, transformers, PEFT)
made each of those processes' import 3.1x longer on the CPU, 1.26 -> 3.91 s, before it could read
its first shard (``bench/startup_cost.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from salm.model.salm import SALM, GenerationResult

__all__ = ["SALM", "GenerationResult"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from salm.model import salm

        return getattr(salm, name)
    raise AttributeError(f"module 'salm.model' has no attribute {name!r}")
