"""The auxiliary encoder CTC loss (``trainer.aux_ctc_weight``): what it adds, where its gradient goes,
and that it never leaks into the exported SALM."""

from __future__ import annotations

import pytest
import torch

from salm.audio import load_audio
from salm.data.collate import collate_rows
from salm.errors import SALMConfigError
from salm.train.engine import LossModule

PROMPT = "Transcribe the following: <|audioplaceholder|>"


def _batch(model, clips) -> dict:
    """A training batch through the production collate, with the transcripts the CTC reads."""
    rows = []
    for clip in clips:
        encoded = model.prompt_format.encode_dialog(
            [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": clip.text}]
        )
        rows.append(
            {
                "audio": load_audio(clip.path, model.sampling_rate),
                "input_ids": encoded.input_ids.numpy(),
                "loss_mask": encoded.loss_mask.numpy(),
                "id": clip.path.stem,
                "text": clip.text,
                "duration": 0.0,
            }
        )
    return collate_rows(rows, model.text_pad_id)


@pytest.fixture
def fresh_salm(tiny_model_cfg):
    from salm.model import SALM

    torch.manual_seed(0)
    return SALM(tiny_model_cfg).train()


def test_loss_adds_weighted_ctc_and_logs_the_llm_loss_apart(fresh_salm, speech_clips) -> None:
    batch = _batch(fresh_salm, [c for c in speech_clips if c.text != "yes"][:4])
    module = LossModule(fresh_salm, aux_ctc_weight=0.5)
    torch.manual_seed(1)
    out = module(batch)
    torch.manual_seed(1)  # same dropout masks: the LLM loss must be exactly SALM's own
    plain = fresh_salm.loss(batch)["loss"]
    assert torch.allclose(out["llm_loss"], plain.detach())
    assert out["ctc_loss"] > 1.0  # a random head is far from the transcript
    assert torch.allclose(out["loss"], out["llm_loss"] + 0.5 * out["ctc_loss"])


def test_ctc_gradient_reaches_the_encoder_and_its_head_only(fresh_salm, speech_clips) -> None:
    batch = _batch(fresh_salm, speech_clips[:3])
    module = LossModule(fresh_salm, aux_ctc_weight=1.0)
    fresh_salm.loss(batch)  # SALM's own forward: the CTC reads the encoder states it captured
    module.aux_ctc(batch["texts"]).backward()
    encoder_grads = [p.grad for p in fresh_salm.perception.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in encoder_grads)
    assert module.aux_ctc.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in fresh_salm.perception.proj.parameters())  # CTC reads before proj
    with pytest.raises(RuntimeError, match="SALM forward to run first"):
        module.aux_ctc(batch["texts"])  # states are used once: a stale batch is never scored twice


def test_weight_zero_is_plain_salm_and_the_head_never_enters_the_model(fresh_salm, speech_clips) -> None:
    keys = set(fresh_salm.state_dict())
    assert LossModule(fresh_salm).aux_ctc is None
    with_ctc = LossModule(fresh_salm, aux_ctc_weight=0.3)
    assert set(fresh_salm.state_dict()) == keys  # export (HF layout / .nemo) sees no CTC head
    assert any(name.startswith("aux_ctc.head") for name in with_ctc.state_dict())


def test_negative_weight_is_refused_with_the_key_named(tiny_llm_dir) -> None:
    from salm.train.recipe import load_recipe

    with pytest.raises(SALMConfigError, match="trainer.aux_ctc_weight"):
        load_recipe(
            "tiny",
            [
                f"model.pretrained_llm={tiny_llm_dir}",
                "data.train_ds.shar_path=/x",
                "trainer.aux_ctc_weight=-1",
            ],
        )
