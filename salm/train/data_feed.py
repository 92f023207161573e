"""Where training meets the data pipeline: Ray Datasets on the driver, batches in the workers.

The train set is split across workers (``streaming_split``) and bucketed inside each worker;
validation sets are given whole to every worker (see ``salm.train.validation`` for why).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import ray.data
import ray.train
from omegaconf import DictConfig, OmegaConf


def _data_config(cfg: DictConfig, section: DictConfig, **extra):
    from salm.data.config import DataConfig

    values = {"prompt": str(cfg.data.prompt), **OmegaConf.to_container(section, resolve=True), **extra}
    return DataConfig.from_dict(values)


def build_datasets(cfg: DictConfig) -> dict[str, ray.data.Dataset]:
    """``train`` (infinite, shuffled) and one ``val_<name>`` per validation set (finite)."""
    from salm.data.pipeline import build_dataset

    text = {
        "tokenizer_dir": str(cfg.model.tokenizer_path or cfg.model.pretrained_llm),
        "prompt_format": str(cfg.model.prompt_format),
        "audio_locator_tag": str(cfg.model.audio_locator_tag),
    }
    datasets = {"train": build_dataset(_data_config(cfg, cfg.data.train_ds), **text, infinite=True)}
    for name, section in (cfg.data.validation_ds.get("datasets") or {}).items():
        datasets[f"val_{name}"] = build_dataset(_data_config(cfg, section), **text, infinite=False)
    return datasets


def train_batches(
    cfg: DictConfig, pad_id: int, token_equivalent_duration: float, seed_offset: int = 0
) -> Iterator[dict]:
    """This worker's bucketed training batches (seed moved on after a resume, so data is not replayed)."""
    from salm.data.bucketing import iterate_batches

    seed = int(cfg.data.train_ds.get("seed", cfg.trainer.seed)) + seed_offset
    data_cfg = _data_config(
        cfg, cfg.data.train_ds, token_equivalent_duration=token_equivalent_duration, seed=seed
    )
    rows = ray.train.get_dataset_shard("train").iter_rows()
    return iter(iterate_batches(rows, data_cfg, pad_id))


class _FixedBatches:
    """Re-iterable fixed-size batches over a validation shard, in dataset order."""

    def __init__(self, shard, batch_size: int, pad_id: int) -> None:
        self.shard, self.batch_size, self.pad_id = shard, batch_size, pad_id

    def __iter__(self) -> Iterator[dict]:
        from salm.data.collate import collate_rows

        rows: list[dict] = []
        for row in self.shard.iter_rows():
            rows.append(row)
            if len(rows) == self.batch_size:
                yield collate_rows(rows, self.pad_id)
                rows = []
        if rows:
            yield collate_rows(rows, self.pad_id)


def validation_batches(cfg: DictConfig, pad_id: int) -> dict[str, Iterable[dict]]:
    batch_size = int(cfg.data.validation_ds.get("batch_size", 8))
    names = list((cfg.data.validation_ds.get("datasets") or {}).keys())
    return {
        name: _FixedBatches(ray.train.get_dataset_shard(f"val_{name}"), batch_size, pad_id) for name in names
    }
