"""``freeze_params`` / ``prevent_freeze_params``: regexes over parameter names, as in NeMo's SALM."""

from __future__ import annotations

import logging
import re

from torch import nn

from salm.errors import SALMConfigError

log = logging.getLogger(__name__)


def compile_patterns(patterns: list[str], field: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise SALMConfigError(f"`model.{field}` has an invalid regex {pattern!r}: {error}") from error
    return compiled


def apply_freezing(module: nn.Module, freeze_params: list[str], prevent_freeze_params: list[str]) -> int:
    """Freeze parameters whose name matches (``re.match``) a ``freeze_params`` pattern, unless a
    ``prevent_freeze_params`` pattern matches too. Returns the number of trainable parameters.

    Patterns that match nothing are logged: a typo there silently trains (or freezes) too much.
    """
    freeze = compile_patterns(freeze_params, "freeze_params")
    keep = compile_patterns(prevent_freeze_params, "prevent_freeze_params")
    used: set[str] = set()
    trainable = 0
    for name, param in module.named_parameters():
        frozen_by = [p.pattern for p in freeze if p.match(name)]
        kept_by = [p.pattern for p in keep if p.match(name)]
        used.update(frozen_by, kept_by)
        if frozen_by and not kept_by:
            param.requires_grad = False
        if param.requires_grad:
            trainable += param.numel()
    for pattern in [p.pattern for p in freeze + keep if p.pattern not in used]:
        log.warning("freezing pattern %r matched no parameter (bad regex?)", pattern)
    return trainable
