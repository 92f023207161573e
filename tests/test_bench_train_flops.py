"""``bench/train_throughput.py`` counts a batch's model FLOPs in slices (to fit 1280 s batches on a
GPU): the slices must add up to the whole batch's count, FLOPs and LLM positions alike."""

import pytest
import torch

from bench.train_throughput import (
    build_tokenizer_model,
    count_flops,
    count_in_parts,
    make_batches,
    recipe,
    write_llm_dir,
)
from salm.train.engine import build_model


@pytest.fixture(scope="module")
def tiny_model_and_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict]:
    """The tiny recipe's SALM in train mode and one bucketed batch of 6 clips of 1-2 s (counting
    FLOPs changes neither, so both tests share them)."""
    cfg = recipe(write_llm_dir(tmp_path_factory.mktemp("llm") / "llm", tiny=True), tiny=True)
    batch = make_batches(build_tokenizer_model(cfg), 12.0, 3, tiny=True)[0]
    torch.manual_seed(0)
    return build_model(cfg, torch.device("cpu")).train(), batch


def test_counting_a_batch_in_parts_gives_the_whole_batchs_count(tiny_model_and_batch) -> None:
    model, batch = tiny_model_and_batch
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    whole = count_in_parts(model, batch, 1, autocast)
    assert batch["audios"].shape[0] == 6 and whole[0] > 0
    assert count_in_parts(model, batch, 2, autocast) == whole
    assert count_in_parts(model, batch, 3, autocast) == whole
    first_half = count_flops(model, {key: value[:3] for key, value in batch.items()}, autocast)
    assert first_half[0] < whole[0]  # a slice alone counts less: the parts are really counted apart


def test_every_slice_keeps_llm_padding(tiny_model_and_batch, monkeypatch) -> None:
    """A slice without padding makes transformers drop the mask and use grouped-query SDPA, which
    torch 2.11's FLOP counter refuses (it stopped a 1280 s count on the H200): each slice keeps one."""
    import bench.train_throughput as bench_module

    model, batch = tiny_model_and_batch
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    unpadded = []
    counted = count_flops

    def count_and_check(model, batch: dict, autocast) -> tuple[int, int]:
        with torch.no_grad(), autocast:
            unpadded.append(bool(model.prepare_inputs(batch)["attention_mask"].all()))
        return counted(model, batch, autocast)

    monkeypatch.setattr(bench_module, "count_flops", count_and_check)
    count_in_parts(model, batch, 3, autocast)
    assert len(unpadded) == 4 and not any(unpadded)  # 3 slices + the anchors alone
