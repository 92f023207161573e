"""The SALM model: perception (NeMo preprocessor + FastConformer + adapter + proj) and a PEFT LLM."""

from salm.model.salm import SALM, GenerationResult

__all__ = ["SALM", "GenerationResult"]
