"""Prompt formats produce NeMo's exact token ids and loss masks with the real Qwen3 tokenizer."""

import pytest

from salm.assets.tiny_llm import qwen3_tokenizer_dir
from salm.errors import PromptError, SALMConfigError
from salm.text.prompt_formats import PromptFormat, get_prompt_format
from salm.text.tokenizer import load_tokenizer

TAG = "<|audioplaceholder|>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(qwen3_tokenizer_dir(), TAG)


@pytest.fixture(scope="module")
def nemo_tokenizer():
    from nemo.collections.common.tokenizers import AutoTokenizer

    nemo = AutoTokenizer(str(qwen3_tokenizer_dir()), use_fast=True)
    nemo.add_special_tokens({"additional_special_tokens": [TAG]})
    return nemo


def _nemo_turns(turns: list[dict]) -> list[dict]:
    return [{"role": t["role"], "slots": {"message": t["content"]}} for t in turns]


TRAINING = [
    {"role": "user", "content": f"Transcribe the following: {TAG}"},
    {"role": "assistant", "content": "the old farmer found a red box"},
]
INFERENCE = [{"role": "user", "content": f"Transcribe the following: {TAG}"}]


@pytest.mark.parametrize("name", ["qwen", "plain", "llama3"])
def test_training_dialog_matches_nemo(name: str, tokenizer, nemo_tokenizer) -> None:
    from nemo.collections.common.prompts import PromptFormatter

    ours = get_prompt_format(name, tokenizer).encode_dialog(TRAINING)
    theirs = PromptFormatter.resolve(name)(nemo_tokenizer).encode_dialog(_nemo_turns(TRAINING))
    assert ours.input_ids.tolist() == theirs["input_ids"].tolist()
    assert ours.loss_mask.tolist() == theirs["mask"].tolist()


@pytest.mark.parametrize("name", ["qwen", "llama3"])
def test_inference_dialog_matches_nemo_and_ends_with_assistant_prefix(
    name: str, tokenizer, nemo_tokenizer
) -> None:
    from nemo.collections.common.prompts import PromptFormatter

    ours = get_prompt_format(name, tokenizer).encode_dialog(INFERENCE)
    theirs = PromptFormatter.resolve(name)(nemo_tokenizer).encode_dialog(_nemo_turns(INFERENCE))
    assert ours.input_ids.tolist() == theirs["input_ids"].tolist()
    assert not ours.loss_mask.any()


def test_qwen_loss_mask_covers_exactly_the_answer_turn(tokenizer) -> None:
    encoded = get_prompt_format("qwen", tokenizer).encode_dialog(TRAINING)
    masked = encoded.input_ids[encoded.loss_mask].tolist()
    assert tokenizer.decode(masked) == "<|im_start|>assistant\nthe old farmer found a red box<|im_end|>\n"
    assert (encoded.input_ids == tokenizer.convert_tokens_to_ids(TAG)).sum() == 1


def test_a_new_format_is_one_small_class(tokenizer) -> None:
    class Bracketed(PromptFormat):
        name = "bracketed-test"
        templates = {"user": "[Q] |message|\n", "assistant": "[A] |message|\n"}

    try:
        encoded = get_prompt_format("bracketed-test", tokenizer).encode_dialog(TRAINING)
        assert (
            tokenizer.decode(encoded.input_ids[encoded.loss_mask].tolist())
            == "[A] the old farmer found a red box\n"
        )
    finally:
        del PromptFormat.registry["bracketed-test"]


def test_unknown_prompt_format_names_the_known_ones(tokenizer) -> None:
    with pytest.raises(SALMConfigError, match="`model.prompt_format` is 'gpt9'.*llama3, plain, qwen"):
        get_prompt_format("gpt9", tokenizer)


def test_unknown_role_is_rejected(tokenizer) -> None:
    with pytest.raises(PromptError, match="no role 'narrator'"):
        get_prompt_format("plain", tokenizer).encode_dialog([{"role": "narrator", "content": "hi"}])
