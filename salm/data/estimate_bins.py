"""``salm data estimate-bins``: bucket bins from the data, like Lhotse's ``estimate-bucket-bins``.

Reads only the cut manifests of the Shar shards (no audio), applies the duration limits, and lets
Lhotse's ``estimate_duration_buckets`` place ``num_buckets - 1`` boundaries so that every bucket
holds the same total length. In token mode the lengths are NeMo's LLM positions, so the prompt is
tokenized for every cut (text only).
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterator

import fsspec
from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets
from tqdm import tqdm

from salm.data.bucketing import Example, make_constraint, measure
from salm.data.config import DataConfig
from salm.data.processing import encode_example
from salm.data.shar_source import resolve_sources
from salm.errors import SALMConfigError
from salm.model.config import AUDIO_LOCATOR_TAG


def _cuts(cfg: DataConfig) -> Iterator[dict]:
    for source in resolve_sources(cfg.sources):
        for shard in source.shards:
            with fsspec.open(shard.cuts, "rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
                for line in lines:
                    yield json.loads(line)


def estimate_bins(
    cfg: DataConfig,
    num_buckets: int,
    *,
    num_examples: int | None = None,
    tokenizer_dir: str | None = None,
    prompt_format: str = "qwen",
    audio_locator_tag: str = AUDIO_LOCATOR_TAG,
) -> list[float]:
    """Bins for ``cfg.bucket_duration_bins`` (seconds, or tokens when ``cfg.use_multimodal_sampling``)."""
    if num_buckets < 2:
        raise SALMConfigError(f"`--buckets` must be >= 2, got {num_buckets}")
    if cfg.token_mode and tokenizer_dir is None:
        raise SALMConfigError(
            "token mode (`data.use_multimodal_sampling`) needs `--tokenizer` to count tokens"
        )
    constraint = make_constraint(cfg) if cfg.token_mode else None

    def examples() -> Iterator[Example]:
        for cut in _cuts(cfg):
            duration = float(cut["duration"])
            if (cfg.min_duration is not None and duration < cfg.min_duration) or (
                cfg.max_duration is not None and duration > cfg.max_duration
            ):
                continue
            num_tokens = 0
            if cfg.token_mode:
                supervisions = cut.get("supervisions") or [{}]
                text = " ".join(str(s.get("text") or "") for s in supervisions).strip()
                context = (cut.get("custom") or {}).get("context") or ""
                ids, mask = encode_example(
                    text, context, cfg, tokenizer_dir, prompt_format, audio_locator_tag
                )
                num_tokens = measure({"input_ids": ids, "loss_mask": mask, "duration": duration}, cfg)
            yield Example(cut["id"], duration, num_tokens, {})

    sample = list(tqdm(itertools.islice(examples(), num_examples), desc="cuts", unit="cut"))
    if len(sample) < num_buckets:
        raise SALMConfigError(
            f"only {len(sample)} cuts within the limits: fewer than `--buckets` {num_buckets}"
        )
    return [round(float(b), 5) for b in estimate_duration_buckets(sample, num_buckets, constraint=constraint)]
