"""Where training meets the data pipeline: Ray Datasets on the driver, batches in the workers.

The train set is split across workers (``streaming_split``) and bucketed inside each worker;
validation sets are given whole to every worker (see ``salm.train.validation`` for why).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import ray.data
import ray.train
from omegaconf import DictConfig, OmegaConf


def _data_config(cfg: DictConfig, key: str, **extra):
    """The DataConfig of recipe section ``key`` (e.g. ``data.train_ds``); its errors name ``key.<field>``."""
    from salm.data.config import DataConfig

    section = OmegaConf.select(cfg, key)
    values = {"prompt": str(cfg.data.prompt), **OmegaConf.to_container(section, resolve=True), **extra}
    return DataConfig.from_dict(values, section=key)


def build_datasets(cfg: DictConfig) -> dict[str, ray.data.Dataset]:
    """``train`` (infinite, shuffled) and one ``val_<name>`` per validation set (finite)."""
    from salm.data.pipeline import build_dataset

    # Ray Data's per-operator progress bars, redrawn by every worker, bury the training log.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False

    text = {
        "tokenizer_dir": str(cfg.model.tokenizer_path or cfg.model.pretrained_llm),
        "prompt_format": str(cfg.model.prompt_format),
        "audio_locator_tag": str(cfg.model.audio_locator_tag),
    }
    datasets = {"train": build_dataset(_data_config(cfg, "data.train_ds"), **text, infinite=True)}
    for name in cfg.data.validation_ds.get("datasets") or {}:
        datasets[f"val_{name}"] = build_dataset(_validation_config(cfg, name), **text, infinite=False)
    return datasets


def _validation_config(cfg: DictConfig, name: str):
    """Validation set ``name``: fixed-size batches (``data.validation_ds.batch_size``) in dataset order."""
    batch_size = int(cfg.data.validation_ds.get("batch_size", 8))
    return _data_config(
        cfg, f"data.validation_ds.datasets.{name}", batch_size=batch_size, use_bucketing=False, shuffle=False
    )


def train_batches(
    cfg: DictConfig, pad_id: int, token_equivalent_duration: float, seed_offset: int = 0
) -> Iterator[dict]:
    """This worker's bucketed training batches (seed moved on after a resume, so data is not replayed)."""
    from salm.data.bucketing import iterate_batches

    seed = int(cfg.data.train_ds.get("seed", cfg.trainer.seed)) + seed_offset
    data_cfg = _data_config(
        cfg, "data.train_ds", token_equivalent_duration=token_equivalent_duration, seed=seed
    )
    rows = ray.train.get_dataset_shard("train").iter_rows()
    return iter(iterate_batches(rows, data_cfg, pad_id))


class _ValidationBatches:
    """Re-iterable: each validation pass reads the whole set again, in dataset order."""

    def __init__(self, shard, cfg, pad_id: int) -> None:
        self.shard, self.cfg, self.pad_id = shard, cfg, pad_id

    def __iter__(self) -> Iterator[dict]:
        from salm.data.bucketing import iterate_batches

        return iterate_batches(self.shard.iter_rows(), self.cfg, self.pad_id)


def validation_batches(cfg: DictConfig, pad_id: int) -> dict[str, Iterable[dict]]:
    """Fixed-size batches (``data.validation_ds.batch_size``) per named validation set."""
    sets = cfg.data.validation_ds.get("datasets") or {}
    return {
        name: _ValidationBatches(
            ray.train.get_dataset_shard(f"val_{name}"), _validation_config(cfg, name), pad_id
        )
        for name in sets
    }
