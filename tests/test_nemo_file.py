"""The self-contained .nemo file: exact round trips, offline loading, and refusing bad archives."""

import copy
import io
import os
import pickle
import shutil
import tarfile

import pytest
import torch
from offline import block_network
from peft import PeftModel
from tiny_asr import write_tiny_asr_nemo

from salm.assets.tiny_llm import write_tiny_qwen3
from salm.audio import collate_audio, load_audio
from salm.errors import CheckpointError
from salm.io.nemo_file import load_nemo, save_nemo
from salm.model import SALM

PROMPT = "Transcribe the following: <|audioplaceholder|>"


@pytest.fixture(scope="module")
def nemo_path(tiny_salm, tmp_path_factory):
    return save_nemo(tiny_salm, tmp_path_factory.mktemp("nemo") / "tiny.nemo")


@pytest.fixture(scope="module", params=["nemo", "hf"])
def loaded(request, tiny_salm, nemo_path, tmp_path_factory):
    """The tiny model after a round trip through a .nemo file, or through the HF layout."""
    if request.param == "nemo":
        return load_nemo(nemo_path).eval()
    return SALM.from_pretrained(tiny_salm.save_pretrained(tmp_path_factory.mktemp("hf") / "model")).eval()


@pytest.fixture(scope="module")
def batch(tiny_salm, speech_clips):
    dialogs = [
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": clip.text}]
        for clip in speech_clips[:3]
    ]
    encoded = [tiny_salm.prompt_format.encode_dialog(d) for d in dialogs]
    audios, audio_lens = collate_audio([load_audio(u.path, 16000) for u in speech_clips[:3]])
    pad = tiny_salm.text_pad_id
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


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        inputs = model.prepare_inputs(batch)
        return model(inputs["input_embeds"], inputs["attention_mask"])


def test_round_trip_reproduces_logits_exactly(tiny_salm, loaded, batch) -> None:
    assert torch.equal(_logits(tiny_salm, batch), _logits(loaded, batch))


def test_round_trip_reproduces_generations(tiny_salm, loaded, speech_clips) -> None:
    audios = [u.path for u in speech_clips[:3]]
    prompts = [[{"role": "user", "content": PROMPT, "audio": a}] for a in audios]
    expected = tiny_salm.generate(prompts, max_new_tokens=6).token_ids
    assert loaded.generate(prompts, max_new_tokens=6).token_ids == expected
    assert len(expected[0]) > 0


def test_loaded_config_keeps_the_recorded_source_paths(tiny_salm, nemo_path) -> None:
    loaded = load_nemo(nemo_path)
    assert loaded.cfg.pretrained_llm == tiny_salm.cfg.pretrained_llm
    assert loaded.cfg.lora.r == 8


def test_loads_offline_with_the_source_llm_and_asr_deleted(tiny_model_cfg, tmp_path, monkeypatch) -> None:
    llm_dir = write_tiny_qwen3(tmp_path / "llm", with_weights=True)
    asr = write_tiny_asr_nemo(tmp_path / "asr.nemo")
    tiny_model_cfg.update(pretrained_llm=str(llm_dir), pretrained_asr=str(asr), pretrained_weights=True)
    tiny_model_cfg.perception.encoder = {}  # all of it from the ASR model
    model = SALM(tiny_model_cfg).eval()
    archive = save_nemo(model, tmp_path / "export" / "model.nemo")
    shutil.rmtree(llm_dir)
    asr.unlink()
    block_network(monkeypatch)

    restored = load_nemo(archive)
    original, loaded_weights = model.state_dict(), restored.state_dict()
    assert all(torch.equal(original[k], loaded_weights[k]) for k in original)
    assert restored.cfg.pretrained_asr == str(asr)  # recorded, never read


def test_merged_lora_loads_without_peft_and_gives_the_same_logits(tiny_salm, batch, tmp_path) -> None:
    archive = save_nemo(copy.deepcopy(tiny_salm), tmp_path / "merged.nemo", merge_lora=True)
    merged = load_nemo(archive).eval()
    assert not isinstance(merged.llm, PeftModel) and "lora" not in merged.cfg
    assert not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged, batch), _logits(tiny_salm, batch), rtol=1e-4, atol=1e-5)


def test_bf16_export_stores_bf16_weights(tiny_salm, nemo_path, tmp_path) -> None:
    archive = save_nemo(tiny_salm, tmp_path / "bf16.nemo", dtype=torch.bfloat16)
    ratio = _weights_size(archive) / _weights_size(nemo_path)
    assert 0.45 < ratio < 0.55
    assert load_nemo(archive).perception.proj.weight.dtype == torch.float32  # loads into the fp32 model


def _weights_size(archive) -> int:
    with tarfile.open(archive) as tar:
        return tar.getmember("./model_weights.safetensors").size


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SALM_PWNED']}",))


def test_a_malicious_pickle_inside_a_nemo_is_refused(nemo_path, tmp_path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SALM_PWNED", str(marker))
    evil = tmp_path / "evil.nemo"
    with tarfile.open(nemo_path) as source, tarfile.open(evil, "w:") as target:
        for member in source.getmembers():
            if member.name.endswith(("model_weights.safetensors", "salm_nemo.json")):
                continue
            target.addfile(member, source.extractfile(member))
        payload = io.BytesIO()
        torch.save({"encoder.weight": _RunsCode()}, payload)
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = payload.tell()
        payload.seek(0)
        target.addfile(info, payload)

    with pytest.raises(CheckpointError, match="refusing to load"):
        load_nemo(evil)
    assert not marker.exists()


def test_a_plain_pickle_is_refused_too(nemo_path, tmp_path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SALM_PWNED", str(marker))
    evil = tmp_path / "evil.nemo"
    with tarfile.open(nemo_path) as source, tarfile.open(evil, "w:") as target:
        for member in source.getmembers():
            if not member.name.endswith(("model_weights.safetensors", "salm_nemo.json")):
                target.addfile(member, source.extractfile(member))
        payload = pickle.dumps(_RunsCode())
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = len(payload)
        target.addfile(info, io.BytesIO(payload))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_nemo(evil)
    assert not marker.exists()


def test_a_truncated_archive_gives_a_clear_error(nemo_path, tmp_path) -> None:
    for fraction in (0.5, 0.99):
        truncated = tmp_path / f"truncated-{fraction}.nemo"
        truncated.write_bytes(nemo_path.read_bytes()[: int(nemo_path.stat().st_size * fraction)])
        with pytest.raises(CheckpointError, match="truncated"):
            load_nemo(truncated)


def test_flipped_bytes_in_the_weights_fail_the_checksum(nemo_path, tmp_path) -> None:
    with tarfile.open(nemo_path) as tar:
        weights = tar.getmember("./model_weights.safetensors")
    data = bytearray(nemo_path.read_bytes())
    middle = weights.offset_data + weights.size // 2
    data[middle : middle + 8] = bytes(8)
    corrupt = tmp_path / "corrupt.nemo"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match="model_weights.safetensors .* does not match its recorded sha256"
    ):
        load_nemo(corrupt)


def test_a_file_that_is_not_an_archive_gives_a_clear_error(tmp_path) -> None:
    garbage = tmp_path / "garbage.nemo"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable .nemo archive"):
        load_nemo(garbage)


def test_a_member_escaping_the_archive_is_refused(tmp_path) -> None:
    evil = tmp_path / "escape.nemo"
    with tarfile.open(evil, "w:") as tar:
        info = tarfile.TarInfo("../../outside.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(CheckpointError, match="points outside the archive"):
        load_nemo(evil)
    assert not (tmp_path.parent / "outside.txt").exists()
