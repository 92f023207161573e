"""The ``data:`` section schema: NeMo's Lhotse dataloader knob names, typed and validated up front.

A NeMo user's ``train_ds`` keys (``shar_path``, ``use_bucketing``, ``bucket_duration_bins``,
``bucket_batch_size``, ``batch_duration``, ``batch_tokens``, ``use_multimodal_sampling``, ...) mean
the same here. Differences, and why:

* ``shuffle_buffer_size`` is applied in the Ray Data read tasks (on compressed audio, on CPU nodes),
  ``bucket_buffer_size`` in each train worker (on decoded audio), so both default lower than NeMo's
  10000: a train worker holds ``bucket_buffer_size`` decoded clips in memory.
* ``num_workers`` counts Ray Data read tasks for the whole job (each reads, decodes and tokenizes),
  not dataloader processes per rank.
* Unbounded limits are ``null`` rather than ``-1`` / ``inf``.

Every error names the ``data.<field>`` the user has to change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from salm.errors import SALMConfigError
from salm.model.config import asr_prompt

DEFAULT_PROMPT = asr_prompt()


@dataclass(frozen=True)
class SharSourceSpec:
    """One Shar directory (local path or fsspec URL) and its sampling weight."""

    path: str
    weight: float = 1.0


@dataclass
class DataConfig:
    """One dataset's settings (``data.train_ds`` or ``data.validation_ds``)."""

    # Inputs: a path, a list of paths, or [[path, weight], ...] (weights shape the mix in infinite mode).
    shar_path: Any = None
    sample_rate: int = 16000
    # Filters. Token counts are NeMo's: prompt + answer tokens, audio as ceil(duration / ted) tokens.
    min_duration: float | None = None
    max_duration: float | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    # Prompt: the user turn; a cut's ``context`` (or ``asr_context_prompt``) replaces the text before the tag.
    prompt: str = DEFAULT_PROMPT
    asr_context_prompt: str | None = None
    # Batch size: fixed count, seconds budget, per-bucket sizes, or a token budget.
    batch_size: int | None = None
    batch_duration: float | None = None
    quadratic_duration: float | None = None
    use_bucketing: bool = False
    bucket_duration_bins: list[float] | None = None
    bucket_batch_size: list[int] | None = None
    num_buckets: int = 30
    bucket_buffer_size: int = 2000
    shuffle_buffer_size: int = 1000
    drop_last: bool = False
    # Token mode (NeMo's multimodal sampling): lengths in LLM positions instead of seconds.
    use_multimodal_sampling: bool = False
    batch_tokens: int | None = None
    quadratic_factor: float | None = None
    measure_total_length: bool = True
    token_equivalent_duration: float | None = None
    # Order and Ray Data execution.
    shuffle: bool = False
    seed: int = 0
    num_workers: int = 2
    block_size_mb: float = 16.0
    sources: list[SharSourceSpec] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sources = _parse_shar_path(self.shar_path)
        _validate(self)

    @classmethod
    def from_dict(cls, values: Any, section: str = "data") -> DataConfig:
        """Build from a dict or OmegaConf node; unknown keys raise instead of being silently ignored.

        ``section`` is where these keys live in the user's file (``data.train_ds`` in a recipe):
        errors name ``<section>.<field>``, the line to change.
        """
        try:
            return cls._from_dict(values)
        except SALMConfigError as error:
            if section == "data":
                raise
            raise SALMConfigError(str(error).replace("`data.", f"`{section}.")) from None

    @classmethod
    def _from_dict(cls, values: Any) -> DataConfig:
        if hasattr(values, "items") and not isinstance(values, dict):  # DictConfig
            from omegaconf import OmegaConf

            values = OmegaConf.to_container(values, resolve=True)
        if not isinstance(values, dict):
            raise SALMConfigError(f"the `data.` section must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SALMConfigError(
                f"unknown key(s) in the data config: {', '.join(f'`data.{k}`' for k in unknown)}. "
                f"Known keys: {', '.join(sorted(known))}."
            )
        return cls(**values)

    @property
    def token_mode(self) -> bool:
        return self.use_multimodal_sampling

    @property
    def needs_token_lengths(self) -> bool:
        """Whether rows must be measured in tokens (token-mode batching or token filters)."""
        return self.token_mode or self.min_tokens is not None or self.max_tokens is not None


def _parse_shar_path(value: Any) -> list[SharSourceSpec]:
    if value is None or value == "" or value == []:
        raise SALMConfigError(
            "`data.shar_path` is not set: give a Shar directory (local or fsspec URL), a list of them, "
            "or [[path, weight], ...]. Make one with `salm data prepare`."
        )
    if isinstance(value, str):
        return [SharSourceSpec(value)]
    if not isinstance(value, (list, tuple)):
        raise SALMConfigError(f"`data.shar_path` must be a string or a list, got {type(value).__name__}")
    sources = []
    for item in value:
        if isinstance(item, str):
            sources.append(SharSourceSpec(item))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
            try:
                weight = float(item[1])
            except (TypeError, ValueError):
                raise SALMConfigError(
                    f"`data.shar_path` entry {list(item)!r}: the weight must be a number"
                ) from None
            if not weight > 0 or math.isinf(weight):
                raise SALMConfigError(f"`data.shar_path` entry {list(item)!r}: the weight must be > 0")
            sources.append(SharSourceSpec(item[0], weight))
        else:
            raise SALMConfigError(
                f"`data.shar_path` entries must be paths or [path, weight] pairs, got {item!r}"
            )
    return sources


def _positive(cfg: DataConfig, name: str, allow_none: bool = True) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise SALMConfigError(f"`data.{name}` must be > 0, got {value!r}")


def _validate(cfg: DataConfig) -> None:
    _positive(cfg, "sample_rate", allow_none=False)
    for name in (
        "max_duration",
        "max_tokens",
        "batch_size",
        "batch_duration",
        "batch_tokens",
        "quadratic_duration",
        "quadratic_factor",
        "token_equivalent_duration",
        "num_workers",
        "block_size_mb",
    ):
        _positive(cfg, name)
    for low, high in (("min_duration", "max_duration"), ("min_tokens", "max_tokens")):
        lo, hi = getattr(cfg, low), getattr(cfg, high)
        if lo is not None and hi is not None and lo > hi:
            raise SALMConfigError(f"`data.{low}` ({lo}) must be <= `data.{high}` ({hi})")
    if cfg.shuffle_buffer_size < 0 or cfg.bucket_buffer_size < 1:
        raise SALMConfigError(
            "`data.shuffle_buffer_size` must be >= 0 and `data.bucket_buffer_size` >= 1, got "
            f"{cfg.shuffle_buffer_size} and {cfg.bucket_buffer_size}"
        )
    if cfg.needs_token_lengths and cfg.token_equivalent_duration is None:
        raise SALMConfigError(
            "`data.token_equivalent_duration` must be set when `data.use_multimodal_sampling` or "
            "`data.min_tokens`/`data.max_tokens` are used: audio counts as ceil(duration / "
            "token_equivalent_duration) tokens (0.08 for canary-qwen-2.5b: 10 ms hop x 8 subsampling)."
        )
    _validate_batching(cfg)


def _validate_batching(cfg: DataConfig) -> None:
    if cfg.bucket_duration_bins is not None or cfg.bucket_batch_size is not None:
        cfg.use_bucketing = True  # NeMo turns bucketing on when its knobs are set
    bins = cfg.bucket_duration_bins
    if bins is not None:
        if not bins or any(isinstance(b, (list, tuple)) for b in bins):
            raise SALMConfigError(
                "`data.bucket_duration_bins` must be a non-empty flat list of numbers "
                "(2D bucketing is not supported)"
            )
        if list(bins) != sorted(bins):
            raise SALMConfigError(f"`data.bucket_duration_bins` must be sorted ascending, got {bins}")
    if cfg.bucket_batch_size is not None:
        if bins is None:
            raise SALMConfigError(
                "`data.bucket_batch_size` needs `data.bucket_duration_bins` (one batch size per bin)"
            )
        if len(cfg.bucket_batch_size) != len(bins):
            raise SALMConfigError(
                f"`data.bucket_batch_size` has {len(cfg.bucket_batch_size)} entries but "
                f"`data.bucket_duration_bins` has {len(bins)}: give one batch size per bin"
            )
        if any(not isinstance(b, int) or b < 1 for b in cfg.bucket_batch_size):
            raise SALMConfigError(
                f"`data.bucket_batch_size` entries must be integers >= 1, got {cfg.bucket_batch_size}"
            )
    if cfg.use_bucketing and bins is None and cfg.num_buckets < 2:
        raise SALMConfigError(f"`data.num_buckets` must be >= 2, got {cfg.num_buckets}")
    has_size = (
        cfg.batch_size is not None
        or cfg.bucket_batch_size is not None
        or (not cfg.token_mode and cfg.batch_duration is not None)
        or (cfg.token_mode and cfg.batch_tokens is not None)
    )
    if not has_size:
        raise SALMConfigError(
            "the batch size is not configured: set `data.batch_size`, `data.batch_duration` "
            "(seconds, when `data.use_multimodal_sampling` is false), `data.bucket_duration_bins` + "
            "`data.bucket_batch_size`, or `data.batch_tokens` (when `data.use_multimodal_sampling` is true)"
        )
