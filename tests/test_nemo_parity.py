"""Same tiny config, same weights: NeMo's own SALM and ours give the same logits and loss."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from salm.audio import collate_audio, load_audio

PROMPT = "Transcribe the following: <|audioplaceholder|>"


@pytest.fixture(scope="module")
def nemo_salm(tiny_salm):
    from nemo.collections.speechlm2 import SALM as NeMoSALM

    cfg = copy.deepcopy(tiny_salm.cfg)
    cfg.perception.output_dim = tiny_salm.llm.config.hidden_size
    nemo = NeMoSALM(OmegaConf.to_container(cfg, resolve=True))
    nemo.load_state_dict(tiny_salm.state_dict(), strict=True)
    return nemo.eval()


@pytest.fixture(scope="module")
def batch(tiny_salm, speech_clips):
    dialogs = [
        [
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": "the old farmer found a red box"},
        ],
        [
            {"role": "user", "content": "Compare <|audioplaceholder|> with <|audioplaceholder|>"},
            {"role": "assistant", "content": "same"},
        ],
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "yes"}],
    ]
    encoded = [tiny_salm.prompt_format.encode_dialog(d) for d in dialogs]
    pad = tiny_salm.text_pad_id
    audios, audio_lens = collate_audio([load_audio(u.path, 16000) for u in speech_clips[:4]])
    return {
        "audios": audios,
        "audio_lens": audio_lens,
        "input_ids": torch.nn.utils.rnn.pad_sequence(
            [e.input_ids for e in encoded], batch_first=True, padding_value=pad, padding_side="left"
        ),
        "loss_mask": torch.nn.utils.rnn.pad_sequence(
            [e.loss_mask for e in encoded], batch_first=True, padding_value=False, padding_side="left"
        ),
    }


def test_same_parameter_names_as_nemo(tiny_salm, nemo_salm) -> None:
    assert set(tiny_salm.state_dict()) == set(nemo_salm.state_dict())


def test_logits_match_nemo(tiny_salm, nemo_salm, batch) -> None:
    with torch.no_grad():
        ours = tiny_salm.prepare_inputs(batch)
        theirs = nemo_salm.prepare_inputs(batch)
        our_logits = tiny_salm(ours["input_embeds"], ours["attention_mask"])
        their_logits = nemo_salm(theirs["input_embeds"], attention_mask=theirs["attention_mask"])["logits"]
    assert torch.equal(ours["target_ids"], theirs["target_ids"])
    assert our_logits.shape == their_logits.shape
    assert (our_logits - their_logits).abs().max().item() < 1e-4


def test_loss_matches_nemo(tiny_salm, nemo_salm, batch) -> None:
    with torch.no_grad():
        ours = tiny_salm.loss(batch)["loss"]
        theirs = nemo_salm.training_step(batch, 0)["loss"]
    assert abs(ours.item() - theirs.item()) < 1e-4


def test_lora_weights_are_not_a_no_op(tiny_salm, nemo_salm, batch) -> None:
    """Guards the parity test itself: with zero LoRA B the adapters would not be compared at all."""
    lora_b = [p for n, p in tiny_salm.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
