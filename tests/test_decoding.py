"""The static-cache greedy decoder gives the tokens ``transformers.generate`` gives."""

import torch
from transformers import GenerationConfig

from salm.model.llm import embedding_inside

PROMPT = "Transcribe the following: <|audioplaceholder|>"


def test_greedy_decoder_equals_transformers_generate(tiny_salm, speech_clips) -> None:
    prompts = [[{"role": "user", "content": PROMPT, "audio": u.path}] for u in speech_clips[:3]]
    prompts.append([{"role": "user", "content": "Say something long about nothing at all, please"}])
    embeds, mask = tiny_salm.prepare_generation_inputs(prompts)
    ours = tiny_salm._greedy_decode(embeds, mask, max_new_tokens=12)
    config = GenerationConfig(
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=tiny_salm.text_eos_id,
        pad_token_id=tiny_salm.text_pad_id,
    )
    with torch.no_grad(), embedding_inside(tiny_salm.llm, tiny_salm.embed_tokens):
        theirs = tiny_salm.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


def test_greedy_decoder_pads_after_eos_and_stops_when_all_finished(tiny_salm, speech_clips) -> None:
    embeds, mask = tiny_salm.prepare_generation_inputs(
        [[{"role": "user", "content": PROMPT, "audio": speech_clips[0].path}]]
    )
    eos = tiny_salm.text_eos_id

    def eos_wins(module, args, logits):
        return logits.index_fill(-1, torch.tensor([eos]), 1e4)

    hook = tiny_salm.llm.get_base_model().lm_head.register_forward_hook(eos_wins)
    try:
        out = tiny_salm._greedy_decode(embeds, mask, max_new_tokens=40)
    finally:
        hook.remove()
    assert out.shape[1] < 40
    assert out[0, 0].item() == eos
    assert (out[0, 1:] == tiny_salm.text_pad_id).all()
