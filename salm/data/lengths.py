"""How long an example is in LLM positions: NeMo's multimodal-sampling definition, in one place.

Used by the token filters (``min_tokens``/``max_tokens``), token-mode batching and bucket-bin
estimation, so all three agree.
"""

from __future__ import annotations

import math


def audio_tokens(duration: float, token_equivalent_duration: float) -> int:
    """Audio seconds as LLM positions: ``ceil(duration / token_equivalent_duration)``."""
    return math.ceil(duration / token_equivalent_duration)


def example_length(
    num_input_ids: int,
    num_answer_ids: int,
    duration: float,
    token_equivalent_duration: float,
    measure_total_length: bool,
) -> int:
    """LLM positions of one training dialog after the audio placeholder is expanded.

    As NeMo's ``NeMoMultimodalConversation``: the text tokens (all of them when
    ``measure_total_length``, else only the context before the answer) minus the one placeholder
    token, plus ``ceil(duration / token_equivalent_duration)`` audio positions.
    """
    text = num_input_ids if measure_total_length else num_input_ids - num_answer_ids
    return text - 1 + audio_tokens(duration, token_equivalent_duration)
