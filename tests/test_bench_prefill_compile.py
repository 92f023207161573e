"""bench/prefill_compile.py runs end to end on the tiny LLM: it times both prefills, finds the same
first tokens and one compiled graph over its batch sizes and prompt lengths."""

import json

from own_process import refused_usage, run_python


def test_the_prefill_bench_times_both_paths_over_one_graph(tmp_path) -> None:
    run_python(
        "-m", "bench.prefill_compile", "--tiny", "--device", "cpu", "--batch-sizes", "2", "3",
        "--prompt-len", "12", "--repeats", "1", "--out", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "prefill_compile_tiny.json").read_text())
    assert set(result["rows"]) == {"2x12", "2x5", "3x12", "3x5"}
    assert all(row["eager_s"] > 0 and row["compiled_s"] > 0 for row in result["rows"].values())
    assert result["compiled_graphs"] == 1
    assert result["first_tokens_agree"] is True


def test_a_prompt_too_short_for_the_second_length_or_an_empty_batch_is_refused() -> None:
    said = refused_usage("-m", "bench.prefill_compile", "--tiny", "--device", "cpu", "--prompt-len", "5")
    assert "--prompt-len must be at least 9" in said
    said = refused_usage("-m", "bench.prefill_compile", "--tiny", "--device", "cpu", "--batch-sizes", "0")
    assert "--batch-sizes, --new-tokens and --repeats must be at least 1" in said
