"""Word error rate and token accuracy: the numbers validation and `salm eval` report.

WER is computed with jiwer over the whole set (errors summed over utterances / reference words
summed), after the Whisper English normalizer by default, as the Open ASR Leaderboard does: it
removes casing, punctuation and spelling variants ("colour"/"color", "Mr."/"mister") that are
not recognition errors. Pure functions, no model imports: the training loop uses them too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache

import jiwer


@dataclass(frozen=True)
class WerResult:
    """Corpus-level WER and its error counts (``wer = (S + D + I) / ref_words``)."""

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    ref_words: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@cache
def _english_normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_text(text: str, normalize: bool = True) -> str:
    """Whisper's English normalization (``normalize=True``) or only whitespace collapsing."""
    if normalize:
        text = _english_normalizer()(text)
    return " ".join(text.split())


def word_error_rate(refs: list[str], hyps: list[str], normalize: bool = True) -> WerResult:
    """WER of hypotheses against references, pairwise, summed over the whole list.

    An empty reference (after normalization) contributes its hypothesis words as insertions and
    no reference words, instead of failing the whole evaluation.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses; they must pair up")
    substitutions = deletions = insertions = ref_words = 0
    pairs = [
        (normalize_text(r, normalize), normalize_text(h, normalize)) for r, h in zip(refs, hyps, strict=True)
    ]
    scored = [(r, h) for r, h in pairs if r]
    insertions += sum(len(h.split()) for r, h in pairs if not r)
    if scored:
        out = jiwer.process_words([r for r, _ in scored], [h for _, h in scored])
        substitutions += out.substitutions
        deletions += out.deletions
        insertions += out.insertions
        ref_words += out.substitutions + out.deletions + out.hits
    errors = substitutions + deletions + insertions
    wer = errors / ref_words if ref_words else float(errors > 0)
    return WerResult(wer, substitutions, deletions, insertions, ref_words)


def token_accuracy(correct_tokens: int, target_tokens: int) -> float:
    """Teacher-forced next-token accuracy over the answer tokens (0.0 when there are none)."""
    return correct_tokens / target_tokens if target_tokens else 0.0
