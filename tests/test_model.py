"""The SALM module: loss definition, freezing, LoRA, batched generation, token duration, bad input."""

import copy
import shutil

import pytest
import torch

from salm.audio import collate_audio, load_audio
from salm.errors import AudioLoadError, PromptError, SALMConfigError
from salm.model import SALM
from salm.model.placeholders import IGNORE_INDEX

PROMPT = "Transcribe the following: <|audioplaceholder|>"


def _batch(model: SALM, clips, answers: list[str], extra_left_pad: int = 0) -> dict[str, torch.Tensor]:
    encoded = [
        model.prompt_format.encode_dialog(
            [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer}]
        )
        for answer in answers
    ]
    pad = model.text_pad_id
    ids = torch.nn.utils.rnn.pad_sequence(
        [e.input_ids for e in encoded], batch_first=True, padding_value=pad, padding_side="left"
    )
    mask = torch.nn.utils.rnn.pad_sequence(
        [e.loss_mask for e in encoded], batch_first=True, padding_value=False, padding_side="left"
    )
    if extra_left_pad:
        ids = torch.nn.functional.pad(ids, (extra_left_pad, 0), value=pad)
        mask = torch.nn.functional.pad(mask, (extra_left_pad, 0), value=False)
    audios, audio_lens = collate_audio([load_audio(u.path, model.sampling_rate) for u in clips])
    return {"audios": audios, "audio_lens": audio_lens, "input_ids": ids, "loss_mask": mask}


def test_loss_is_mean_cross_entropy_over_answer_tokens_only(tiny_salm, speech_clips) -> None:
    batch = _batch(tiny_salm, speech_clips[:3], ["a b c", "hello there", "yes"])
    with torch.no_grad():
        loss = tiny_salm.loss(batch)
        inputs = tiny_salm.prepare_inputs(batch)
        logits = tiny_salm(inputs["input_embeds"], inputs["attention_mask"])
    targets = inputs["target_ids"]
    answer_tokens = int(batch["loss_mask"].sum())
    assert int(loss["num_target_tokens"]) == answer_tokens == int((targets != IGNORE_INDEX).sum())
    manual = torch.nn.functional.cross_entropy(
        logits[targets != IGNORE_INDEX], targets[targets != IGNORE_INDEX]
    )
    assert torch.allclose(loss["loss"], manual, atol=1e-5)


def test_loss_ignores_extra_padding_and_prompt_wording(tiny_salm, speech_clips) -> None:
    answers = ["the old farmer", "yes"]
    with torch.no_grad():
        plain = tiny_salm.loss(_batch(tiny_salm, speech_clips[:2], answers))["loss"]
        padded = tiny_salm.loss(_batch(tiny_salm, speech_clips[:2], answers, extra_left_pad=7))["loss"]
    assert torch.allclose(plain, padded, atol=1e-5)


def test_default_freezing_trains_perception_and_lora_only(tiny_salm) -> None:
    trainable = {name for name, p in tiny_salm.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable"
    assert all(n.startswith("perception.") or ".lora_" in n for n in trainable)
    assert any(n.startswith("perception.encoder.") for n in trainable)
    llm_trainable = {n for n in trainable if n.startswith("llm.")}
    assert llm_trainable == {n for n, _ in tiny_salm.named_parameters() if ".lora_" in n}
    assert not tiny_salm.embed_tokens.weight.requires_grad


def test_freeze_params_and_prevent_freeze_params_regexes(tiny_model_cfg) -> None:
    tiny_model_cfg.freeze_params = [r"^llm\..+$", r"^embed_tokens\..+$", r"^perception\.encoder\..+$"]
    tiny_model_cfg.prevent_freeze_params = [r"^perception\.encoder\.layers\.1\..+$"]
    model = SALM(tiny_model_cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("perception.encoder.layers.0.") for n in trainable)
    assert any(n.startswith("perception.encoder.layers.1.") for n in trainable)
    assert any(n.startswith("perception.proj.") for n in trainable)


def test_frozen_parts_stay_in_eval_mode_when_training(tiny_model_cfg) -> None:
    tiny_model_cfg.freeze_params.append(r"^perception\.encoder\..+$")
    model = SALM(tiny_model_cfg).train()
    assert not model.perception.encoder.training  # fully frozen: no dropout, BatchNorm stats fixed
    assert model.llm.training  # LoRA is trainable, so its dropout stays active
    assert model.perception.proj.training


def test_lora_changes_only_through_adapter_weights(tiny_salm, speech_clips) -> None:
    model = copy.deepcopy(tiny_salm).train()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.loss(_batch(model, speech_clips[:2], ["a", "b"]))["loss"].backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert any(".lora_" in n for n in changed)
    assert all(".lora_" in n for n in changed if n.startswith("llm."))


def test_generate_batch_of_uneven_audio_equals_one_by_one(tiny_salm, speech_clips) -> None:
    paths = [u.path for u in speech_clips]
    batched = tiny_salm.generate(
        [[{"role": "user", "content": PROMPT, "audio": p}] for p in paths], max_new_tokens=6
    )
    for index, path in enumerate(paths):
        single = tiny_salm.generate([[{"role": "user", "content": PROMPT, "audio": path}]], max_new_tokens=6)
        assert single.token_ids[0] == batched.token_ids[index]
        assert single.texts[0] == batched.texts[index]
    assert len({tuple(ids) for ids in batched.token_ids}) > 1, (
        "different audios should not all decode the same"
    )


def test_generate_accepts_waveforms_and_several_audios_per_prompt(tiny_salm, speech_clips) -> None:
    waves = [load_audio(u.path, tiny_salm.sampling_rate) for u in speech_clips[:2]]
    result = tiny_salm.generate(
        [[{"role": "user", "content": "A: <|audioplaceholder|> B: <|audioplaceholder|>", "audio": waves}]],
        max_new_tokens=3,
    )
    assert len(result.token_ids) == 1 and len(result.token_ids[0]) <= 3


def test_sampling_differs_from_greedy_with_high_temperature(tiny_salm, speech_clips) -> None:
    prompt = [[{"role": "user", "content": PROMPT, "audio": speech_clips[0].path}]]
    torch.manual_seed(0)
    samples = {
        tuple(tiny_salm.generate(prompt, max_new_tokens=5, do_sample=True, temperature=5.0).token_ids[0])
        for _ in range(3)
    }
    assert len(samples) > 1


def test_token_equivalent_duration_follows_hop_subsampling_and_adapter(tiny_salm, tiny_model_cfg) -> None:
    assert tiny_salm.token_equivalent_duration == pytest.approx(0.01 * 8)
    tiny_model_cfg.perception.modality_adapter = {
        "_target_": "salm.model.adapters.StackingMLPAdapter",
        "d_model": 64,
        "stack": 2,
    }
    stacked = SALM(tiny_model_cfg).eval()
    assert stacked.token_equivalent_duration == pytest.approx(0.16)
    frames, lens = stacked.perception(torch.randn(2, 16000), torch.tensor([16000, 8000]))
    assert lens.tolist() == [7, 4] and frames.shape == (2, 7, 64)


def test_conformer_adapter_builds_from_nemo_class(tiny_model_cfg) -> None:
    tiny_model_cfg.perception.modality_adapter = {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 64,
        "d_model": 64,
        "n_layers": 1,
        "n_heads": 4,
        "subsampling_factor": 1,
    }
    model = SALM(tiny_model_cfg).eval()
    frames, lens = model.perception(torch.randn(1, 16000), torch.tensor([16000]))
    assert frames.shape[-1] == 64 and isinstance(model.perception.proj, torch.nn.Linear)


# ----- bad input gets a clear error -----
def test_prompt_with_wrong_number_of_placeholders(tiny_salm, speech_clips) -> None:
    prompt = [[{"role": "user", "content": "no tag here", "audio": speech_clips[0].path}]]
    with pytest.raises(
        PromptError, match="prompt #0 has 0 <\\|audioplaceholder\\|> placeholder\\(s\\) but 1 audio"
    ):
        tiny_salm.generate(prompt)


def test_repeated_prompts_are_tokenised_once_and_give_the_same_ids(tiny_salm) -> None:
    model = copy.deepcopy(tiny_salm)
    model._prompt_cache.clear()  # other tests' prompts
    text = "Transcribe the following: <|audioplaceholder|>"
    prompts = [
        [{"role": "user", "content": text}],
        [{"role": "user", "content": "Say hello"}],
        [{"role": "user", "slots": {"message": text}}],  # NeMo's form: unhashable, encoded every time
    ] * 3
    tokens, _ = model.encode_prompts(prompts)
    expected = [model.prompt_format.encode_dialog(p).input_ids for p in prompts]
    assert len(model._prompt_cache) == 2  # one entry per distinct hashable prompt text
    for row, ids in zip(tokens, expected, strict=True):
        assert torch.equal(row[row.shape[0] - ids.shape[0] :], ids)  # left-padded rows end with the ids
    with pytest.raises(PromptError, match="placeholder"):  # the cached count still checks the audios
        model.encode_prompts([[{"role": "user", "content": "Say hello", "audio": torch.zeros(160)}]])


def test_missing_audio_file(tiny_salm, tmp_path) -> None:
    with pytest.raises(AudioLoadError, match="does not exist"):
        tiny_salm.transcribe([tmp_path / "nope.wav"])


def test_undecodable_audio_file(tiny_salm, tmp_path) -> None:
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(AudioLoadError, match="could not decode"):
        tiny_salm.transcribe([bogus])


def test_llm_dir_without_tokenizer(tiny_model_cfg, tmp_path) -> None:
    shutil.copy(f"{tiny_model_cfg.pretrained_llm}/config.json", tmp_path / "config.json")
    tiny_model_cfg.pretrained_llm = str(tmp_path)
    with pytest.raises(SALMConfigError, match="has no tokenizer"):
        SALM(tiny_model_cfg)


def test_unknown_prompt_format_in_config(tiny_model_cfg) -> None:
    tiny_model_cfg.prompt_format = "chatgpt"
    with pytest.raises(SALMConfigError, match="not a known prompt format"):
        SALM(tiny_model_cfg)


def test_invalid_lora_rank(tiny_model_cfg) -> None:
    tiny_model_cfg.lora.r = 0
    with pytest.raises(SALMConfigError, match="`model.lora.r` must be > 0, got 0"):
        SALM(tiny_model_cfg)


def test_unlisted_module_target_is_refused(tiny_model_cfg) -> None:
    tiny_model_cfg.perception.modality_adapter = {"_target_": "os.system", "command": "true"}
    with pytest.raises(SALMConfigError, match="modality_adapter._target_` is 'os.system'"):
        SALM(tiny_model_cfg)


def test_missing_llm_path(tiny_model_cfg) -> None:
    tiny_model_cfg.pretrained_llm = "/nonexistent/qwen"
    with pytest.raises(SALMConfigError, match="does not exist|no config.json"):
        SALM(tiny_model_cfg)


def test_a_deep_copy_computes_mel_features_with_its_own_front_end(tiny_salm) -> None:
    """NeMo's featurizer kept a forward bound to the original: a copy on the GPU ran it on the CPU."""
    model = copy.deepcopy(tiny_salm)
    model.perception.preprocessor.featurizer.fb.zero_()  # the copy's filterbank only
    audio, lengths = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0)), torch.tensor([16000])
    original, _ = tiny_salm.perception.preprocessor(input_signal=audio, length=lengths)
    copied, _ = model.perception.preprocessor(input_signal=audio, length=lengths)
    assert original.abs().sum() > 0
    assert not torch.allclose(copied, original)
