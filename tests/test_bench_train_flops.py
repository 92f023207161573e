"""``bench/train_throughput.py`` counts a batch's model FLOPs in slices (to fit 1280 s batches on a
GPU): the slices must add up to the whole batch's count, FLOPs and LLM positions alike."""

import json
from pathlib import Path

import pytest
import torch

from bench.common import recipe, write_llm_dir
from bench.train_batches import build_tokenizer_model, make_batches
from bench.train_throughput import count_flops, count_in_parts, describe_batches, reused_counts
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


def test_flop_counts_are_reused_only_for_the_same_batches(tmp_path) -> None:
    """``--flops-from``: an earlier JSON's counts for the same batches, a clear refusal for others."""
    batches = [{"audios": torch.zeros(3, 16000)}, {"audios": torch.zeros(2, 24000)}]
    counts = [{"flops": 10, "positions": 7}, {"flops": 20, "positions": 9}]
    recorded = tmp_path / "train_throughput.json"
    recorded.write_text(
        json.dumps({"batches": [{**d, **c} for d, c in zip(describe_batches(batches), counts, strict=True)]})
    )

    assert reused_counts(recorded, batches) == counts
    with pytest.raises(SystemExit, match="it counted other batches"):
        reused_counts(recorded, [{"audios": torch.zeros(3, 16000)}, {"audios": torch.zeros(2, 24001)}])
    with pytest.raises(SystemExit, match="no per-batch counts to reuse"):
        reused_counts(tmp_path / "missing.json", batches)


def test_counts_of_other_batches_are_refused_before_anything_trains(tmp_path) -> None:
    """A ``--flops-from`` JSON of other batches (another --budget-s) used to be found out only after
    every variant had trained, and that run's timings were lost; the bench now stops at once."""
    import subprocess
    import sys

    recorded = tmp_path / "train_throughput.json"
    recorded.write_text(
        json.dumps({"batches": [{"clips": 1, "max_audio_s": 1.0, "flops": 1, "positions": 1}]})
    )
    done = subprocess.run(
        [sys.executable, "-m", "bench.train_throughput", "--tiny", "--skip", "nemo", "plain",
         "--variants", "packed", "--flops-from", str(recorded)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert "it counted other batches" in done.stderr and "Traceback" not in done.stderr
    assert "ours took" not in done.stdout  # nothing trained


def test_padding_report_recovers_the_clips_share_of_the_counted_flops(tiny_model_and_batch) -> None:
    """``bench/batch_padding.py``: counts made from known per-row costs at the padded widths give back
    those costs summed over the clips' own lengths; a JSON with other positions is refused."""
    import numpy as np

    from bench.batch_padding import clip_lengths, padding_report, terms

    model, _ = tiny_model_and_batch
    batches = make_batches(model, 80.0, 0, tiny=False)  # 5-40 s buckets, 2-8 clips each
    cost = np.array([3e9, 2e7, 1e9, 4e5])  # per audio s, s^2, LLM position, position^2
    counts, clip_flops = [], 0.0
    for batch in batches:
        seconds, positions = clip_lengths(model, batch)
        counts.append(
            {
                "flops": int(len(seconds) * terms(seconds.max(), positions.max()) @ cost),
                "positions": int(positions.sum()),
            }
        )
        clip_flops += float(terms(seconds, positions).sum(axis=1) @ cost)

    report = padding_report(model, batches, counts, source="counts.json")
    counted = sum(c["flops"] for c in counts)
    assert report["clip_flops_share"] == pytest.approx(clip_flops / counted, rel=1e-6)
    assert report["clip_flops_share"] < 0.99 and report["fit_residual"] < 1e-6
    assert 0.5 < report["audio_fill"] < 1 and 0.5 < report["llm_fill"] < 1
    assert [row["clips"] for row in report["batches"]] == [len(b["audio_lens"]) for b in batches]
    counts[0]["positions"] += 1
    with pytest.raises(SystemExit, match="another model or prompt"):
        padding_report(model, batches, counts, source="counts.json")


def test_fresh_lengths_bring_frame_counts_no_earlier_pass_had(tiny_model_and_batch) -> None:
    """``compiled_fresh_lengths``' feed: every pass, each batch's padded audio one encoder frame
    shorter than the pass before, the clips that reached past it trimmed, the shorter ones kept."""
    from bench.train_throughput import SAMPLES_PER_ENCODER_FRAME, FreshLengths

    _, batch = tiny_model_and_batch
    width, lens = batch["audios"].shape[1], batch["audio_lens"]
    feed = FreshLengths([batch], torch.device("cpu"))
    for passes in (1, 2, 3):
        (seen,) = list(feed)
        keep = width - passes * SAMPLES_PER_ENCODER_FRAME
        assert seen["audios"].shape == (batch["audios"].shape[0], keep)
        assert torch.equal(seen["audio_lens"], lens.clamp(max=keep))
        assert torch.equal(seen["audios"], batch["audios"][:, :keep])
        assert torch.equal(seen["input_ids"], batch["input_ids"])  # the text stays the same
    assert (lens < width - 3 * SAMPLES_PER_ENCODER_FRAME).any()  # some clips were too short to cut
    assert batch["audios"].shape[1] == width  # the source batches are not changed


def test_our_feeds_plan_each_cut_batchs_layout_and_the_device_layout_variants_do_not(
    tiny_model_and_batch,
) -> None:
    """Our path's batches carry the layout of the batch as cut (the frame counts of the shortened
    clips); the baselines' feeds and the device-layout variants carry none."""
    from bench.train_throughput import FreshLengths

    model, batch = tiny_model_and_batch
    feed = FreshLengths([batch], torch.device("cpu"), layout_model=model)
    for _ in range(2):
        (seen,) = list(feed)
        assert torch.equal(seen["layout"].audio_frames, model.perception.frame_counts(seen["audio_lens"]))
    feed.layout_model = None
    (seen,) = list(feed)
    assert "layout" not in seen
    assert "layout" not in next(iter(FreshLengths([batch], torch.device("cpu"))))


def test_fresh_lengths_for_every_path_refuses_the_variant_that_would_cut_twice(monkeypatch, capsys) -> None:
    from bench import train_throughput

    argv = ["train_throughput", "--tiny", "--fresh-lengths", "--variants", "compiled_fresh_lengths"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as stopped:
        train_throughput.main()
    assert stopped.value.code == 2
    assert "leave out the compiled_fresh_lengths variant" in capsys.readouterr().err


def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's loss on ``batch`` and its gradients, with the same dropout masks every call."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model.loss(batch)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_training_numbers(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0])
    assert len(before[1]) == len(after[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))


def test_the_bool_mask_gathers_variant_trains_the_same_numbers_and_is_undone(tiny_model_and_batch) -> None:
    """``compiled_fresh_lengths_bool_mask_gathers`` times the step's old gathers: same loss and gradients
    as the model's own (packed rows, as the recipe), and the next variant gets the model's back."""
    import salm.model.salm as salm_module
    from bench.train_throughput import set_bool_mask_gathers
    from salm.model import packing, placeholders

    model, batch = tiny_model_and_batch
    model.pack_llm_sequences = True
    try:
        set_bool_mask_gathers(model, True)
        assert salm_module.pack_sequences is not packing.pack_sequences
        assert model.perception.encoder.sync_max_audio_length is True
        before = loss_and_grads(model, batch)
        set_bool_mask_gathers(model, False)
        assert salm_module.pack_sequences is packing.pack_sequences
        assert salm_module.gather_target_positions is placeholders.gather_target_positions
        assert model.perception.encoder.sync_max_audio_length is False
        after = loss_and_grads(model, batch)
    finally:
        set_bool_mask_gathers(model, False)
        model.pack_llm_sequences = False
        model.zero_grad(set_to_none=True)
    assert_same_training_numbers(before, after)


def test_the_nemo_normalize_variant_trains_the_same_numbers_and_is_undone(tiny_model_and_batch) -> None:
    """``compiled_fresh_lengths_nemo_normalize`` times NeMo's ``normalize_batch`` (its ``.item()``
    waits for the GPU): the same loss and gradients as the model's own normalisation, and the next
    variant gets the model's back."""
    from bench.train_throughput import set_nemo_feature_normalization

    model, batch = tiny_model_and_batch
    featurizer = model.perception.preprocessor.featurizer
    try:
        set_nemo_feature_normalization(model, True)
        assert featurizer.normalize == "per_feature" and not model.perception.normalizes_per_feature
        before = loss_and_grads(model, batch)
        set_nemo_feature_normalization(model, False)
        assert featurizer.normalize is None and model.perception.normalizes_per_feature
        after = loss_and_grads(model, batch)
    finally:
        set_nemo_feature_normalization(model, False)
        model.zero_grad(set_to_none=True)
    assert_same_training_numbers(before, after)


def test_the_compiled_variants_take_the_recipes_depthwise_convolutions_and_the_before_variant_nemos(
    tiny_model_and_batch,
) -> None:
    """Compiled variants run the depthwise convolutions as ``compile_layers`` sets them (shifted sums);
    ``compiled_fresh_lengths_conv_depthwise`` puts NeMo's back whether it runs first or later, and
    reports the change so that compiled layers are traced again."""
    from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D

    from bench.train_throughput import set_compiled_levers
    from salm.model.depthwise_conv import DepthwiseConvAsShiftedSums, use_shifted_sum_depthwise_convs

    model, _ = tiny_model_and_batch
    encoder = model.perception.encoder

    def depthwise_classes() -> set[type]:
        return {type(layer.conv.depthwise_conv) for layer in encoder.layers}

    try:
        assert depthwise_classes() == {CausalConv1D}  # the eager model: NeMo's
        assert set_compiled_levers(model, "compiled_fresh_lengths") is True
        assert depthwise_classes() == {DepthwiseConvAsShiftedSums}
        assert set_compiled_levers(model, "compiled_fresh_lengths_conv_depthwise") is True
        assert depthwise_classes() == {CausalConv1D}
        assert set_compiled_levers(model, "compiled_fresh_lengths_conv_depthwise") is False  # already set
        assert set_compiled_levers(model, "compiled") is True
        assert depthwise_classes() == {DepthwiseConvAsShiftedSums}
    finally:
        use_shifted_sum_depthwise_convs(encoder, enabled=False)  # the shared fixture stays eager
    assert depthwise_classes() == {CausalConv1D}


def test_a_run_without_the_recipes_step_keeps_its_timings_apart_from_the_official_json() -> None:
    """A run of lever variants alone wrote no JSON at all (the 2026-12-05 H200 levers run came back
    as a log only); it now goes to its own file, and the official name stays for the recipe's step."""
    from bench.train_throughput import result_name

    levers = {
        "ours[compiled_fresh_lengths]": {"audio_s_per_s": 1404.0},
        "ours[compiled_fresh_lengths_conv_depthwise]": {"audio_s_per_s": 1446.0},
    }
    assert result_name(levers, tiny=False) == ("train_throughput_variants", None)
    assert result_name({}, tiny=False) == ("train_throughput_variants", None)  # every path failed
    official = {**levers, "ours[compiled]": {"audio_s_per_s": 1441.0}, "nemo": {"audio_s_per_s": 801.0}}
    assert result_name(official, tiny=False) == ("train_throughput", "ours[compiled]")
    both = {"ours[default]": {"audio_s_per_s": 900.0}, "ours[compiled]": {"audio_s_per_s": 1441.0}}
    assert result_name(both, tiny=True) == ("train_throughput_tiny", "ours[compiled]")
