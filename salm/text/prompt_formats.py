"""Prompt formats: turn a chat (list of turns) into ``input_ids`` + ``loss_mask``.

A format is one small class with a template per role, registered by its ``name``. The output
is token-for-token what NeMo's ``PromptFormatter`` of the same name produces (tests check the
``qwen`` one against NeMo), so data prepared here trains models that NeMo can run and back.

Each audio is written in the text as one ``audio_locator_tag``; the model later swaps that
single token for the audio's encoder frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from salm.errors import PromptError, SALMConfigError

MESSAGE_SLOT = "|message|"


@dataclass(frozen=True)
class EncodedDialog:
    """Token ids of a whole dialog and which of them the loss is computed on."""

    input_ids: torch.Tensor  # (T,) int64
    loss_mask: torch.Tensor  # (T,) bool: True on the final assistant turn of a training example


class PromptFormat:
    """Base class: subclasses set ``name``, ``templates`` and optionally ``inference_prefix``."""

    name: ClassVar[str]
    templates: ClassVar[dict[str, str]]  # role -> template containing ``|message|``
    output_role: ClassVar[str] = "assistant"
    inference_prefix: ClassVar[str | None] = None  # appended when the dialog ends on a user turn
    preamble: ClassVar[str] = ""  # written once before the first turn, never a loss target
    insert_eos: ClassVar[bool] = False  # append tokenizer.eos after the final assistant turn

    registry: ClassVar[dict[str, type[PromptFormat]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in PromptFormat.registry:
            raise TypeError(f"prompt format {cls.name!r} is registered twice")
        PromptFormat.registry[cls.name] = cls

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_dialog(self, turns: list[dict]) -> EncodedDialog:
        """Encode turns ``{"role": ..., "content": str}`` (NeMo's ``{"slots": {"message": ...}}`` also works).

        A dialog ending on the output role is a training example: the loss mask covers that last
        turn. Otherwise it is a generation prompt and ``inference_prefix`` is appended.
        """
        if not turns:
            raise PromptError("a prompt needs at least one turn, got an empty list")
        ids: list[int] = self._ids(self.preamble) if self.preamble else []
        mask: list[bool] = [False] * len(ids)
        for index, turn in enumerate(turns):
            role, message = _role_and_message(turn, self.name)
            if role not in self.templates:
                raise PromptError(
                    f"prompt format {self.name!r} has no role {role!r}; known roles: {sorted(self.templates)}"
                )
            turn_ids = self._ids(self.templates[role].replace(MESSAGE_SLOT, message))
            is_target = role == self.output_role and index == len(turns) - 1
            ids += turn_ids
            mask += [is_target] * len(turn_ids)
        is_training = turns[-1]["role"] == self.output_role
        if is_training and self.insert_eos:
            ids.append(self.tokenizer.eos_token_id)
            mask.append(True)
        if not is_training and self.inference_prefix is not None:
            prefix = self._ids(self.inference_prefix)
            ids += prefix
            mask += [False] * len(prefix)
        return EncodedDialog(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool))


def _role_and_message(turn: dict, format_name: str) -> tuple[str, str]:
    if "role" not in turn:
        raise PromptError(f"every turn needs a 'role' (prompt format {format_name!r}); got {turn!r}")
    if "content" in turn:
        message = turn["content"]
    elif "slots" in turn and "message" in turn["slots"]:
        message = turn["slots"]["message"]
    else:
        raise PromptError(f"turn {turn!r} has no 'content'")
    if not isinstance(message, str):
        raise PromptError(f"turn content must be a string, got {type(message).__name__}")
    return turn["role"], message


class QwenFormat(PromptFormat):
    """ChatML as used by Canary-Qwen-2.5B (NeMo's ``qwen``)."""

    name = "qwen"
    templates = {
        "system": "<|im_start|>system\n|message|<|im_end|>\n",
        "user": "<|im_start|>user\n|message|<|im_end|>\n",
        "assistant": "<|im_start|>assistant\n|message|<|im_end|>\n",
    }
    inference_prefix = "<|im_start|>assistant\n"


class PlainFormat(PromptFormat):
    """No markup at all: the user text followed directly by the answer (NeMo's ``plain``).

    Like NeMo's, it appends no end-of-sequence token, so generation runs to ``max_new_tokens``;
    prefer a chat format for transcription.
    """

    name = "plain"
    templates = {"user": "|message|", "assistant": "|message|"}


class Llama3Format(PromptFormat):
    """Llama 3 chat headers (NeMo's ``llama3``), for SALMs built on a Llama-family LLM."""

    name = "llama3"
    templates = {
        "system": "<|start_header_id|>system<|end_header_id|>\n\n|message|<|eot_id|>",
        "user": "<|start_header_id|>user<|end_header_id|>\n\n|message|<|eot_id|>",
        "assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n|message|<|eot_id|>",
    }
    inference_prefix = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    preamble = "<|begin_of_text|>"


def get_prompt_format(name: str, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """Instantiate the registered format ``name`` for ``tokenizer``."""
    if name not in PromptFormat.registry:
        raise SALMConfigError(
            f"`model.prompt_format` is {name!r}, which is not a known prompt format. "
            f"Known: {', '.join(sorted(PromptFormat.registry))}."
        )
    return PromptFormat.registry[name](tokenizer)
