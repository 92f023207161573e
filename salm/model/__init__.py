"""The SALM model: perception (NeMo preprocessor + FastConformer + adapter + proj) and a PEFT LLM.

``SALM`` and ``GenerationResult`` load on first use: the data pipeline's Ray workers import only
``salm.model.config`` (for the prompt), and importing the model with it (NeMo, transformers, PEFT)
cost each of those processes 2.5 s before it could read its first shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from salm.model.salm import SALM, GenerationResult

__all__ = ["SALM", "GenerationResult"]


def __getattr__(name: str):
    if name in __all__:
        from salm.model import salm

        return getattr(salm, name)
    raise AttributeError(f"module 'salm.model' has no attribute {name!r}")
