"""``bench/train_throughput.py`` counts a batch's model FLOPs in slices (to fit 1280 s batches on a
GPU): the slices must add up to the whole batch's count, FLOPs and LLM positions alike."""

import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.train_throughput import build_tokenizer_model, count_in_parts, make_batches, recipe, write_llm_dir
from salm.train.engine import build_model


def test_counting_a_batch_in_parts_gives_the_whole_batchs_count() -> None:
    cfg = recipe(write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=True), tiny=True)
    batch = make_batches(build_tokenizer_model(cfg), 12.0, 3, tiny=True)[0]  # 6 clips of 1-2 s
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu")).train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def count(part: dict) -> tuple[int, int]:
        with FlopCounterMode(display=False) as counter:
            with autocast:
                out = model.loss(part)
            out["loss"].backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops(), int(out["num_positions"])

    whole = count_in_parts(model, batch, 1, count, autocast)
    assert batch["audios"].shape[0] == 6 and whole[0] > 0
    assert count_in_parts(model, batch, 2, count, autocast) == whole
    assert count_in_parts(model, batch, 3, count, autocast) == whole
    first_half = count({key: value[:3] for key, value in batch.items()})
    assert first_half[0] < whole[0]  # a slice alone counts less: the parts are really counted apart
