"""bench/serve_throughput.py's variants of ours on the tiny recipe (CPU): each is timed, its phases
too, and none changes a token (attending to the whole KV cache included); the depthwise convolutions' "before" is refused without the variant
it undoes."""

import json

from own_process import refused_usage, run_python


def test_the_compiled_variants_are_timed_and_keep_ours_tokens(tmp_path) -> None:
    variants = [
        "compiled_prefill",
        "compiled_encoder",
        "whole_cache_decoding",
        "compiled_encoder_conv_depthwise",
    ]
    # 60 new tokens after a 10 s clip's prompt cross a 64-slot window: whole_cache_decoding differs
    run_python(
        "-m", "bench.serve_throughput", "--tiny", "--skip-nemo", "--skip-generate", "--batch-sizes", "2",
        "--new-tokens", "60", "--repeats", "1", "--phases", "--ours-variants", *variants, "--out", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "serve_throughput_tiny.json").read_text())
    assert result["errors"] == {}
    row = result["by_batch_size"]["2"]
    for variant in variants:
        assert row[f"ours_{variant}"]["rtfx"] > 0
        assert row[f"ours_{variant}"]["same_tokens_as_ours"] == 1.0
        # The compiled prefill runs the LLM inside one trace, where module hooks do not fire: the
        # split must still find where the prefill starts and ends (an H100 run lost it, KeyError).
        phases = row[f"ours_{variant}"]["phases"]
        assert sorted(phases) == sorted(["prompts", "mel", "encoder", "splice", "prefill", "decode"])
        assert phases["prefill"] > 0 and phases["decode"] > 0


def test_the_depthwise_before_variant_alone_is_refused() -> None:
    said = refused_usage(
        "-m",
        "bench.serve_throughput",
        "--tiny",
        "--skip-nemo",
        "--ours-variants",
        "compiled_encoder_conv_depthwise",
    )
    assert "the 'before' of compiled_encoder: give both" in said
