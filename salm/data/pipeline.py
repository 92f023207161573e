"""``build_dataset``: Shar shards -> read -> decode -> prompt+tokenize, as one lazy ``ray.data.Dataset``.

The trainer hands the result to Ray Train (``datasets={"train": ds}``), which gives each worker a
``streaming_split`` shard; ``salm.data.bucketing.iterate_batches`` turns that shard into batches.
"""

from __future__ import annotations

from salm.data.config import DataConfig
from salm.data.processing import check_prompt, decode_batch, tokenize_batch
from salm.data.shar_source import make_datasource, resolve_sources

ROW_COLUMNS = ("id", "audio", "duration", "text", "input_ids", "loss_mask", "skipped", "filtered")


def build_dataset(
    cfg: DataConfig,
    tokenizer_dir: str,
    prompt_format: str,
    audio_locator_tag: str,
    *,
    infinite: bool,
    epoch: int = 0,
):
    """The rows of ``cfg.shar_path`` as a lazy Ray Dataset (see ``ROW_COLUMNS``).

    ``infinite=True``: a never-ending weighted mix (train with ``max_steps``). ``infinite=False``:
    every shard once, shard order shuffled with ``cfg.seed + epoch`` when ``cfg.shuffle``; build a
    new dataset with the next ``epoch`` for another pass in a new order.

    Rows: ``id`` str, ``audio`` float32 (S,) at ``cfg.sample_rate``, ``duration`` seconds, ``text``,
    ``input_ids`` int64 (T,) holding one ``audio_locator_tag``, ``loss_mask`` bool (T,), and the
    counts ``skipped``/``filtered`` of rows dropped just before it. A row with an empty ``id``
    only carries counts; ``iterate_batches`` accounts for it and drops it.
    """
    import ray

    check_prompt(cfg, tokenizer_dir, prompt_format, audio_locator_tag)
    datasource, num_read_tasks = make_datasource(
        resolve_sources(cfg.sources),
        infinite=infinite,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        epoch=epoch,
        shuffle=cfg.shuffle,
        shuffle_buffer_size=cfg.shuffle_buffer_size,
        max_duration=cfg.max_duration,
    )
    # One block per read task at planning time keeps read and map stages fused (no extra hop).
    dataset = ray.data.read_datasource(datasource, override_num_blocks=num_read_tasks)
    # Ray Data merges a task's output up to this size before passing it on; the default (128 MiB)
    # would hold back a slow infinite stream for minutes.
    dataset.context.target_max_block_size = int(cfg.block_size_mb * 2**20)
    dataset = dataset.map_batches(decode_batch, fn_kwargs={"cfg": cfg}, batch_size=None, batch_format="numpy")
    return dataset.map_batches(
        tokenize_batch,
        fn_kwargs={
            "cfg": cfg,
            "tokenizer_dir": str(tokenizer_dir),
            "prompt_format": prompt_format,
            "audio_locator_tag": audio_locator_tag,
        },
        batch_size=None,
        batch_format="numpy",
    )
