"""WER and token accuracy as validation and `salm eval` report them."""

import pytest

from salm.metrics import normalize_text, token_accuracy, word_error_rate


def test_wer_counts_substitutions_deletions_and_insertions() -> None:
    result = word_error_rate(
        ["the cat sat on the mat", "hello world"], ["the bat sat on mat", "hello big world"], normalize=False
    )
    assert (result.substitutions, result.deletions, result.insertions) == (1, 1, 1)
    assert result.ref_words == 8
    assert result.wer == pytest.approx(3 / 8)


def test_normalizer_ignores_case_punctuation_and_spelling_variants() -> None:
    refs, hyps = ["Mr. Smith painted the colour box."], ["mister smith painted the color box"]
    assert word_error_rate(refs, hyps, normalize=True).wer == 0.0
    assert word_error_rate(refs, hyps, normalize=False).wer > 0.0


def test_normalize_off_still_collapses_whitespace() -> None:
    assert normalize_text("  a \t b\n", normalize=False) == "a b"


def test_empty_reference_counts_hypothesis_words_as_insertions() -> None:
    result = word_error_rate(["", "yes"], ["uh huh", "yes"], normalize=False)
    assert (result.insertions, result.ref_words) == (2, 1)
    assert result.wer == 2.0


def test_empty_hypothesis_is_all_deletions() -> None:
    result = word_error_rate(["one two three"], [""], normalize=False)
    assert result.deletions == 3 and result.wer == 1.0


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="must pair up"):
        word_error_rate(["a"], ["a", "b"])


def test_token_accuracy_is_zero_without_targets() -> None:
    assert token_accuracy(3, 4) == 0.75
    assert token_accuracy(0, 0) == 0.0
