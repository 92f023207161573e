"""salm/model/batch_layout.py: the LLM rows' indices planned on the host give the loss the device path gives.

The layout is what lets the training step's forward run without reading a device value back
(``tests/test_host_syncs.py`` counts that); these tests hold it to the forward's own numbers.
"""

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_model import _batch

from salm.assets.synthetic_speech import make_sentences, synthesize_corpus
from salm.audio import collate_audio, load_audio
from salm.errors import PromptError
from salm.model import SALM
from salm.model.batch_layout import BatchLayout, batch_layout
from salm.model.config import AUDIO_LOCATOR_TAG, asr_prompt
from salm.model.perception import AudioPerception
from salm.model.placeholders import IGNORE_INDEX
from salm.train.batch_device import to_device, with_layouts

CANARY = Path(__file__).resolve().parents[1] / "salm" / "configs" / "salm_canary_qwen_2.5b.yaml"

# Sample counts around the 160-sample hop and the 8x subsampling's edges, 0.1 s to 3 s.
LENGTHS = [
    1600,
    1601,
    2079,
    2080,
    2081,
    4000,
    8000,
    12_799,
    12_800,
    12_801,
    16_000,
    17_283,
    24_000,
    31_999,
    48_000,
]


def _canary_perception_with_one_layer():
    cfg = OmegaConf.load(CANARY).model.perception
    cfg.encoder.n_layers = 1
    return AudioPerception(cfg)


ADAPTERS = {
    "identity": None,
    "stack 2": {"_target_": "salm.model.adapters.StackingMLPAdapter", "d_model": 64, "stack": 2},
    "stack 3": {"_target_": "salm.model.adapters.StackingMLPAdapter", "d_model": 64, "stack": 3},
    "conformer": {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        **{"feat_in": 64, "d_model": 64, "n_layers": 1, "n_heads": 4, "subsampling_factor": 1},
    },
}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_frame_counts_predict_the_lengths_the_tiny_perception_returns(tiny_model_cfg, adapter: str) -> None:
    perception_cfg = copy.deepcopy(tiny_model_cfg.perception)
    perception_cfg.output_dim = 32  # SALM sets the LLM's width; any will do for lengths
    if ADAPTERS[adapter] is not None:
        perception_cfg.modality_adapter = ADAPTERS[adapter]
    perception = AudioPerception(perception_cfg).eval()
    _assert_frame_counts_match(perception)


def test_frame_counts_predict_the_lengths_the_canary_encoder_returns() -> None:
    _assert_frame_counts_match(_canary_perception_with_one_layer().eval())


def _assert_frame_counts_match(perception: AudioPerception) -> None:
    lengths = torch.tensor(LENGTHS)
    torch.manual_seed(0)
    with torch.no_grad():
        frames, encoded_lens = perception(torch.randn(len(LENGTHS), max(LENGTHS)) * 0.1, lengths)
    predicted = perception.frame_counts(lengths)
    assert predicted is not None and predicted.dtype == torch.int64
    assert predicted.tolist() == encoded_lens.tolist()
    assert int(predicted.max()) == frames.shape[1]
    assert len(set(predicted.tolist())) >= 6  # the lengths do span several frame counts


def _two_audios_in_the_first_row(model, clips) -> dict:
    """Rows of 2 and 1 audios (3 placeholders, 3 clips), left-padded, with answers to learn."""
    contents = [f"Say whether {AUDIO_LOCATOR_TAG} and {AUDIO_LOCATOR_TAG} agree.", asr_prompt()]
    encoded = [
        model.prompt_format.encode_dialog(
            [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        )
        for content, answer in zip(contents, ["they do not", "hello"], strict=True)
    ]
    pad = model.text_pad_id
    ids = torch.nn.utils.rnn.pad_sequence(
        [e.input_ids for e in encoded], batch_first=True, padding_value=pad, padding_side="left"
    )
    mask = torch.nn.utils.rnn.pad_sequence(
        [e.loss_mask for e in encoded], batch_first=True, padding_value=False, padding_side="left"
    )
    audios, audio_lens = collate_audio([load_audio(u.path, model.sampling_rate) for u in clips[:3]])
    return {"audios": audios, "audio_lens": audio_lens, "input_ids": ids, "loss_mask": mask}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("audios", ["one per row", "two in a row"])
def test_a_host_layout_gives_the_loss_and_gradients_of_the_device_path(
    tiny_salm, speech_clips, packed, audios
) -> None:
    model = copy.deepcopy(tiny_salm).eval()  # eval: no dropout, so both passes compute the same thing
    model.pack_llm_sequences = packed
    if audios == "one per row":
        answers = ["hello there", "yes", "a somewhat longer answer here", "no"]
        batch = _batch(model, speech_clips[:4], answers, extra_left_pad=2)
    else:
        batch = _two_audios_in_the_first_row(model, speech_clips)
        assert int((batch["input_ids"][0] == model.audio_locator_tag_id).sum()) == 2
    layout = model.batch_layout(batch)
    assert isinstance(layout, BatchLayout)

    results = []
    for with_layout in (False, True):
        model.zero_grad()
        out = model.loss({**batch, "layout": layout} if with_layout else batch)
        out["loss"].backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((out, grads))
    (device_out, device_grads), (host_out, host_grads) = results
    assert torch.equal(host_out["loss"], device_out["loss"])
    assert torch.equal(host_out["predicted_ids"], device_out["predicted_ids"])
    for host_grad, device_grad in zip(host_grads, device_grads, strict=True):
        torch.testing.assert_close(host_grad, device_grad, rtol=0, atol=0)

    # The indices themselves are the ones the forward finds on the device.
    inputs = model.prepare_inputs(batch)
    real = inputs["attention_mask"].flatten()
    has_target = inputs["target_ids"].flatten() != IGNORE_INDEX
    assert layout.spliced_length == inputs["attention_mask"].shape[1] + 1
    assert torch.equal(layout.real_positions, real.nonzero().squeeze(1))
    assert torch.equal(layout.target_positions, has_target.nonzero().squeeze(1))
    assert torch.equal(layout.packed_target_positions, has_target[real].nonzero().squeeze(1))
    assert layout.target_positions.numel() == int(batch["loss_mask"].sum())


def test_a_layout_whose_frame_counts_are_wrong_is_refused(tiny_salm, speech_clips) -> None:
    batch = _batch(tiny_salm, speech_clips[:2], ["hello", "yes"])
    layout = tiny_salm.batch_layout(batch)
    wrong = BatchLayout(**{**vars(layout), "audio_frames": layout.audio_frames + 1})
    with pytest.raises(RuntimeError, match="frame counts differ from the encoder's"):
        tiny_salm.loss({**batch, "layout": wrong})


def test_a_prompt_without_its_placeholder_is_refused_while_laying_out(tiny_salm, speech_clips) -> None:
    batch = _batch(tiny_salm, speech_clips[:2], ["hello", "yes"])
    frames = tiny_salm.perception.frame_counts(batch["audio_lens"])
    with pytest.raises(PromptError, match="2 audios were given"):
        batch_layout(
            batch["input_ids"].masked_fill(batch["input_ids"] == tiny_salm.audio_locator_tag_id, 0),
            batch["loss_mask"],
            frames,
            tiny_salm.audio_locator_tag_id,
            tiny_salm.text_pad_id,
        )


def test_training_batches_carry_their_layout_to_the_device(tiny_salm, speech_clips) -> None:
    batch = _batch(tiny_salm, speech_clips[:2], ["hello", "yes"])
    (laid_out,) = list(with_layouts([batch], tiny_salm))
    moved = to_device(laid_out, torch.device("cpu"))
    assert isinstance(moved["layout"], BatchLayout)
    assert torch.equal(moved["layout"].real_positions, tiny_salm.batch_layout(batch).real_positions)
    assert "layout" not in batch  # the source's batch is left as it was


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="pinned memory and FlashAttention's varlen kernel need a GPU"
)
def test_on_the_gpu_a_pinned_layout_gives_the_packed_loss_of_the_device_path(tiny_salm, tmp_path) -> None:
    """As the training loop feeds a GPU: the layout planned on the host, pinned with the batch,
    copied without blocking; bf16 autocast, packed rows through FlashAttention's varlen kernel.
    (flite voices only: the GPU machine carries flite, not espeak-ng.)"""
    from salm.train.batch_device import pin_batch

    model = copy.deepcopy(tiny_salm).eval().cuda()
    model.pack_llm_sequences = True
    clips = synthesize_corpus(tmp_path, make_sentences(3, seed=1), ["kal16", "slt", "rms"])
    batch = _batch(model, clips, ["hello there", "yes", "a somewhat longer answer here"])
    (laid_out,) = list(with_layouts([batch], model))
    on_gpu = to_device(pin_batch(laid_out), torch.device("cuda"))
    assert on_gpu["layout"].real_positions.is_cuda
    losses = []
    for feed in (on_gpu, {k: v for k, v in on_gpu.items() if k != "layout"}):
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            losses.append(model.loss(feed)["loss"])
    assert torch.equal(losses[0], losses[1])


def test_an_encoder_with_a_mid_stack_reduction_gets_no_layout_and_trains_on_the_device_path(
    tiny_model_cfg,
) -> None:
    """``frame_counts`` models the subsampling only; an encoder that shortens its frames again inside the
    stack (NeMo's ``reduction``) is not guessed at: no layout, the forward finds the indices itself."""
    tiny_model_cfg.perception.encoder.reduction = "pooling"
    tiny_model_cfg.perception.encoder.reduction_factor = 2
    tiny_model_cfg.perception.encoder.reduction_position = 0
    model = SALM(tiny_model_cfg).eval()
    assert model.perception.frame_counts(torch.tensor([16_000])) is None
    batch = {"audio_lens": torch.tensor([16_000]), "input_ids": torch.zeros(1, 3, dtype=torch.long)}
    assert model.batch_layout(batch) is None
    assert list(with_layouts([batch], model)) == [batch]
