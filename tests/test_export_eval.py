"""`salm export`, `salm eval` and `salm generate` on the tiny model and real synthetic speech."""

import json

import pytest
import torch
from offline import block_network
from safetensors import safe_open

from salm.audio import collate_audio, load_audio
from salm.cli import main
from salm.evaluate import evaluate_on_ray, evaluate_rows, read_shar_rows
from salm.generate import GenerationOptions, read_manifest
from salm.model import SALM

PROMPT = "Transcribe the following: <|audioplaceholder|>"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def ray_checkpoint(tiny_salm, tmp_path_factory):
    """A directory laid out as the training loop's Ray Train checkpoints."""
    checkpoint = tmp_path_factory.mktemp("run") / "checkpoint_000002"
    tiny_salm.save_pretrained(checkpoint / "model")
    (checkpoint / "deepspeed").mkdir()
    (checkpoint / "train_state.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    return checkpoint


@pytest.fixture(scope="module")
def exported(ray_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    code = main(
        [
            "export",
            "--checkpoint",
            str(ray_checkpoint),
            "--nemo",
            str(out / "m.nemo"),
            "--hf",
            str(out / "hf"),
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def manifest(speech_clips, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "test.json"
    with path.open("w") as sink:
        for clip in speech_clips:
            sink.write(
                json.dumps({"audio_filepath": str(clip.path), "text": clip.text, "voice": clip.voice}) + "\n"
            )
    return path


def test_export_writes_a_nemo_and_an_hf_dir_that_load_back(tiny_salm, exported) -> None:
    assert _same_weights(SALM.from_pretrained(exported / "m.nemo"), tiny_salm)
    assert _same_weights(SALM.from_pretrained(exported / "hf"), tiny_salm)


def test_bf16_export_writes_bf16_weights(ray_checkpoint, tmp_path) -> None:
    assert (
        main(["export", "--checkpoint", str(ray_checkpoint), "--hf", str(tmp_path), "--dtype", "bf16"]) == 0
    )
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("perception.proj.weight").dtype == torch.bfloat16


def test_export_without_an_output_is_one_error_line(ray_checkpoint, capsys) -> None:
    assert main(["export", "--checkpoint", str(ray_checkpoint)]) == 2
    assert "give --nemo OUT.nemo and/or --hf OUT_DIR" in capsys.readouterr().err


def test_hf_export_loads_in_nemo_salm_offline_with_the_same_logits(
    tiny_salm, exported, speech_clips, monkeypatch
) -> None:
    from nemo.collections.speechlm2 import SALM as NeMoSALM

    config_file = exported / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["pretrained_llm"] = "Qwen/Qwen3-1.7B"  # as on another machine: only llm_backbone/ can serve
    config_file.write_text(json.dumps(config))
    block_network(monkeypatch)

    nemo = NeMoSALM.from_pretrained(str(exported / "hf")).eval()
    audios, audio_lens = collate_audio([load_audio(u.path, 16000) for u in speech_clips[:2]])
    encoded = [
        tiny_salm.prompt_format.encode_dialog(
            [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": u.text}]
        )
        for u in speech_clips[:2]
    ]
    batch = {
        "audios": audios,
        "audio_lens": audio_lens,
        "input_ids": torch.nn.utils.rnn.pad_sequence(
            [e.input_ids for e in encoded],
            batch_first=True,
            padding_value=tiny_salm.text_pad_id,
            padding_side="left",
        ),
        "loss_mask": torch.nn.utils.rnn.pad_sequence(
            [e.loss_mask for e in encoded], batch_first=True, padding_value=False, padding_side="left"
        ),
    }
    with torch.no_grad():
        ours = tiny_salm.prepare_inputs(batch)
        theirs = nemo.prepare_inputs(batch)
        our_logits = tiny_salm(ours["input_embeds"], ours["attention_mask"])
        their_logits = nemo(theirs["input_embeds"], attention_mask=theirs["attention_mask"])["logits"]
    assert (our_logits - their_logits).abs().max().item() < 1e-4


def test_eval_prints_wer_and_rtfx_and_writes_predictions(
    exported, manifest, speech_clips, tmp_path, capsys
) -> None:
    out = tmp_path / "eval"
    code = main(
        ["eval", str(exported / "m.nemo"), "--manifest", str(manifest), "--out-dir", str(out)]
        + ["--max-new-tokens", "6", "--batch-size", "4"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "WER " in printed and "RTFx " in printed and "token accuracy" in printed
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["audio_filepath"] for p in predictions] == [str(u.path) for u in speech_clips]  # manifest order
    assert all({"pred_text", "wer", "loss", "voice", "duration"} <= p.keys() for p in predictions)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rtfx"] > 0 and 0.0 <= metrics["token_accuracy"] <= 1.0 and metrics["loss"] > 0
    assert metrics["ref_words"] == sum(len(u.text.split()) for u in speech_clips)


def test_inference_weights_take_dtype_and_the_mel_front_end_stays_fp32(exported, manifest, tmp_path) -> None:
    """``--dtype``: bf16 weights where asked (``auto``: on a GPU, as Serve replicas), the log-mel front
    end in fp32 whatever the weights; ``salm eval`` scores a set with bf16 weights end to end."""
    from argparse import Namespace

    from salm.errors import SALMConfigError
    from salm.generate import inference_dtype, load_model_for_inference

    def loaded(dtype: str) -> SALM:
        args = Namespace(
            model=str(exported / "hf"), llm_path=None, tokenizer_path=None, device="cpu", dtype=dtype
        )
        return load_model_for_inference(args)

    def dtypes(module: torch.nn.Module) -> set[torch.dtype]:
        return {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}

    assert dtypes(loaded("auto")) == {torch.float32}  # the CPU's auto
    model = loaded("bfloat16")
    assert dtypes(model.llm) == dtypes(model.perception.encoder) == {torch.bfloat16}
    assert dtypes(model.perception.preprocessor) == {torch.float32}
    assert inference_dtype("cuda", "auto") == torch.bfloat16
    with pytest.raises(SALMConfigError, match="dtype must be one of auto, float32, bfloat16"):
        inference_dtype("cpu", "fp16")

    out = tmp_path / "eval"
    args = [
        "eval",
        str(exported / "hf"),
        "--manifest",
        str(manifest),
        "--out-dir",
        str(out),
        "--dtype",
        "bfloat16",
    ]
    assert main([*args, "--max-new-tokens", "4", "--batch-size", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss"] > 0 and metrics["rtfx"] > 0


def test_eval_with_compile_compiles_the_encoder_and_scores_the_same_transcripts(
    exported, manifest, tmp_path, capsys
) -> None:
    """``--compile``: the Serve replica's setup (``salm.inference_compile``) before the first batch;
    the same predictions as the eager run, and stderr says what was compiled (on the CPU: the encoder)."""
    predictions = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        args = ["eval", str(exported / "hf"), "--manifest", str(manifest), "--out-dir", str(out)]
        assert main([*args, "--max-new-tokens", "6", "--batch-size", "4", *extra]) == 0
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        predictions[name] = [row["pred_text"] for row in rows]
        said = capsys.readouterr().err
    assert predictions["compiled"] == predictions["eager"]
    assert "--compile: the encoder's layers compiled in" in said
    assert "on the CPU they run eagerly" in said


def test_compile_for_inference_says_what_failed_and_leaves_the_model_eager(capsys) -> None:
    from types import SimpleNamespace

    from salm.generate import GenerationOptions, compile_for_inference
    from salm.model.compile import is_compiled

    def prepare_generation_inputs(prompts):
        raise RuntimeError("Failed to find C compiler")

    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    model = SimpleNamespace(
        sampling_rate=16000,
        audio_locator_tag="<|audio|>",
        device=torch.device("cpu"),
        perception=SimpleNamespace(encoder=SimpleNamespace(layers=layers)),
        prepare_generation_inputs=prepare_generation_inputs,
    )
    compile_for_inference(model, GenerationOptions(decoding="beam"))
    said = capsys.readouterr().err
    assert not is_compiled(layers[0])
    assert "compiling the encoder failed (RuntimeError: Failed to find C compiler); it runs eagerly" in said
    assert "--decoding beam runs uncompiled" in said
    assert "--compile: nothing compiled" in said


def test_compile_for_inference_on_a_gpu_compiles_the_step_then_the_prefill_and_says_which_failed(
    capsys,
) -> None:
    """On a GPU ``--compile`` also compiles the decoding step and the prefill (the replica's
    ``compile_decoding`` and ``compile_prefill``); a prefill that fails to compile is said, and the
    step stays compiled."""
    from types import SimpleNamespace

    from salm.generate import GenerationOptions, compile_for_inference

    warm_ups = []

    def transcribe(audios, max_new_tokens):
        warm_ups.append((model.compile_decoding, model.compile_prefill))
        if model.compile_prefill:
            raise RuntimeError("Failed to find C compiler")
        return [""]

    model = SimpleNamespace(
        sampling_rate=16000,
        audio_locator_tag="<|audio|>",
        device=torch.device("cuda"),
        perception=SimpleNamespace(encoder=SimpleNamespace(layers=torch.nn.ModuleList())),
        compile_decoding=False,
        compile_prefill=False,
        transcribe=transcribe,
    )
    compile_for_inference(model, GenerationOptions(max_new_tokens=8))
    said = capsys.readouterr().err
    assert warm_ups == [(True, False), (True, True)]
    assert model.compile_decoding is True and model.compile_prefill is False
    assert "compiling the prefill failed (RuntimeError: Failed to find C compiler); it runs eagerly" in said
    assert "--compile: the encoder's layers and the greedy decoding step compiled in" in said


def test_eval_without_references_says_to_use_generate(exported, tmp_path, speech_clips, capsys) -> None:
    unlabelled = tmp_path / "unlabelled.json"
    unlabelled.write_text(json.dumps({"audio_filepath": str(speech_clips[0].path)}) + "\n")
    assert main(["eval", str(exported / "hf"), "--manifest", str(unlabelled)]) == 2
    assert "Use `salm generate`" in capsys.readouterr().err


def test_eval_on_shar_matches_eval_on_the_manifest_and_skips_broken_cuts(
    exported, manifest, speech_clips, tmp_path, ray_local, capsys
) -> None:
    from salm.data.prepare import prepare_shar

    shar = tmp_path / "shar"
    prepare_shar([str(manifest)], str(shar), shard_size=len(speech_clips) - 1, progress=False)
    last_tar = sorted(shar.glob("recording.*.tar"))[-1]
    last_tar.write_bytes(last_tar.read_bytes()[:100])  # the last shard (one cut) is truncated
    results = {}
    for name, source in (("manifest", ["--manifest", str(manifest)]), ("shar", ["--shar", str(shar)])):
        out = tmp_path / name
        args = ["eval", str(exported / "hf"), *source, "--out-dir", str(out), "--max-new-tokens", "6"]
        assert main(args) == 0
        results[name] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert "skipped 1 broken cut(s)" in capsys.readouterr().out
    from_manifest = {p["text"]: p["pred_text"] for p in results["manifest"]}
    from_shar = {p["text"]: p["pred_text"] for p in results["shar"]}
    assert len(from_shar) == len(speech_clips) - 1
    assert all(from_shar[text] == from_manifest[text] for text in from_shar)  # same audio, same decoding
    assert all("audio_bytes" not in p and p["id"] for p in results["shar"])
    on_ray = evaluate_on_ray(  # encoded audio travels through Ray Data to the model actors
        str(exported / "hf"), read_shar_rows(str(shar)), GenerationOptions(max_new_tokens=6), batch_size=3
    )
    assert {r["text"]: r["pred_text"] for r in on_ray} == from_shar


def test_eval_on_a_missing_shar_dir_is_one_error_line(exported, tmp_path, capsys) -> None:
    assert main(["eval", str(exported / "hf"), "--shar", str(tmp_path / "nowhere")]) == 2
    assert "`--shar`" in capsys.readouterr().err


def test_eval_on_ray_data_actors_matches_the_local_run(tiny_salm, exported, manifest, ray_local) -> None:
    rows = read_manifest(manifest)
    options = GenerationOptions(max_new_tokens=4)
    on_ray = evaluate_on_ray(str(exported / "hf"), rows, options, batch_size=3, num_actors=1)
    local = evaluate_rows(tiny_salm, read_manifest(manifest), options, batch_size=3)
    by_file = {r["audio_filepath"]: r for r in on_ray}
    assert by_file.keys() == {r["audio_filepath"] for r in local}
    for row in local:
        assert by_file[row["audio_filepath"]]["pred_text"] == row["pred_text"]
        assert by_file[row["audio_filepath"]]["loss_sum"] == pytest.approx(row["loss_sum"], rel=1e-4)


def test_generate_writes_one_jsonl_line_per_audio(exported, speech_clips, tmp_path) -> None:
    out = tmp_path / "transcripts.jsonl"
    paths = [str(u.path) for u in speech_clips[:3]]
    code = main(
        ["generate", str(exported / "hf"), *paths, "--out", str(out), "--max-new-tokens", "3"]
        + ["--decoding", "beam", "--num-beams", "2"]
    )
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["audio_filepath"] for line in lines) == sorted(paths)
    assert all(isinstance(line["pred_text"], str) and line["duration"] > 0 for line in lines)


def test_manifest_audio_paths_resolve_against_the_manifest_directory(speech_clips, tmp_path) -> None:
    clip = speech_clips[0].path
    (tmp_path / clip.name).write_bytes(clip.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps({"audio_filepath": clip.name, "text": "x"}) + "\n")
    [row] = read_manifest(tmp_path / "m.json")
    assert row["audio_filepath"] == str(tmp_path / clip.name) and row["duration"] > 0.3


def test_decoding_flags_become_generate_arguments() -> None:
    assert GenerationOptions(decoding="beam", num_beams=3).generate_kwargs()["num_beams"] == 3
    sample = GenerationOptions(decoding="sample", temperature=0.7, top_p=0.9).generate_kwargs()
    assert sample["do_sample"] and sample["temperature"] == 0.7 and sample["top_p"] == 0.9


def test_inference_loads_a_model_trained_with_the_recipes_layout_in_inferences(
    tiny_model_cfg, tmp_path
) -> None:
    """`salm generate`/`eval` switch the encoder to NCHW subsampling and T keys (same numbers): the
    canary recipe's training layout cost each new input shape 0.3-0.6 s on an H200."""
    from argparse import Namespace

    from salm.generate import load_model_for_inference
    from salm.model.encoder_layout import uses_channels_last_subsampling
    from salm.model.rel_shift import StridedRelPositionAttention

    tiny_model_cfg.perception.channels_last_subsampling = True
    tiny_model_cfg.perception.pad_attention_keys_to = 8
    SALM(tiny_model_cfg).save_pretrained(tmp_path / "model")
    args = Namespace(
        model=str(tmp_path / "model"), llm_path=None, tokenizer_path=None, device="cpu", dtype="auto"
    )
    model = load_model_for_inference(args)
    assert model.cfg.perception.channels_last_subsampling is True  # the saved config is untouched
    encoder = model.perception.encoder
    assert not uses_channels_last_subsampling(encoder)
    assert {m.key_multiple for m in encoder.modules() if isinstance(m, StridedRelPositionAttention)} == {0}
