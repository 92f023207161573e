"""Aligned prediction blocks, as users of NeMo's SALM recipe know them::

    ====================================================================================================
    Training Sample 1 | WER: 8.33%
    Full LLM Input : <|im_start|>user Transcribe the following: <|audioplaceholder|> ... (67)
    Prompt         : <|im_start|>user Transcribe the following: (10)
    Audio Token    : <|audioplaceholder|> -> [audio_embeddings] (25)
    Ground Truth   : <|im_start|>assistant ... (32)
    Prediction     : <|im_start|>assistant ... (32)
    ====================================================================================================

Counts are real: LLM positions of the whole input (audio counted as its encoder frames), prompt
tokens before the audio, audio frames after encoder and adapter, answer and predicted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import jiwer

RULE = "=" * 100


@dataclass
class SampleTokens:
    """One example's token ids (no padding) and what the model made of it."""

    input_ids: list[int]  # the full dialog, one placeholder per audio
    answer_ids: list[int]  # the loss-masked target turn
    predicted_ids: list[int]  # teacher-forced argmax (training) or generated ids (validation)
    audio_frames: int  # LLM positions the audio became
    reference: str  # transcript
    hypothesis: str  # predicted transcript


def _show(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False).replace("\n", " ").strip()


def format_block(title: str, index: int, sample: SampleTokens, tokenizer, placeholder_id: int) -> str:
    """One aligned block; WER is of this sample's transcript alone."""
    placeholder = tokenizer.convert_ids_to_tokens(placeholder_id)
    first_audio = (
        sample.input_ids.index(placeholder_id)
        if placeholder_id in sample.input_ids
        else len(sample.input_ids)
    )
    prompt_ids = sample.input_ids[:first_audio]
    num_placeholders = sample.input_ids.count(placeholder_id)
    full_positions = len(sample.input_ids) - num_placeholders + sample.audio_frames
    wer = jiwer.wer(sample.reference or "<empty>", sample.hypothesis or "<empty>")
    rows = [
        RULE,
        f"{title} Sample {index} | WER: {wer:.2%}",
        f"Full LLM Input : {_show(tokenizer, sample.input_ids)} ({full_positions})",
        f"Prompt         : {_show(tokenizer, prompt_ids)} ({len(prompt_ids)})",
        f"Audio Token    : {placeholder} -> [audio_embeddings] ({sample.audio_frames})",
        f"Ground Truth   : {_show(tokenizer, sample.answer_ids)} ({len(sample.answer_ids)})",
        f"Prediction     : {_show(tokenizer, sample.predicted_ids)} ({len(sample.predicted_ids)})",
        RULE,
    ]
    return "\n".join(rows)
