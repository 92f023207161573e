"""Saving and loading the canary-qwen-2.5b HF layout (config.json + model.safetensors)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from salm.errors import CheckpointError
from salm.model import SALM


@pytest.fixture(scope="module")
def saved_dir(tiny_salm, tmp_path_factory):
    return tiny_salm.save_pretrained(tmp_path_factory.mktemp("hf") / "model")


def test_round_trip_restores_every_weight_and_the_config(tiny_salm, saved_dir) -> None:
    loaded = SALM.from_pretrained(saved_dir).eval()
    original, restored = tiny_salm.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    config = json.loads((saved_dir / "config.json").read_text())
    assert config["prompt_format"] == "qwen" and config["audio_locator_tag"] == "<|audioplaceholder|>"
    assert config["lora"]["r"] == 8 and "perception" in config


def test_weights_use_nemo_salm_key_names(saved_dir) -> None:
    with safe_open(str(saved_dir / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert "embed_tokens.weight" in keys
    assert "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "perception.encoder.layers.0.self_attn.linear_q.weight" in keys
    assert "perception.proj.weight" in keys
    assert not any(k.startswith("llm.base_model.model.model.embed_tokens") for k in keys)


def test_published_layout_without_llm_backbone_loads_with_llm_path(
    tiny_salm, saved_dir, tmp_path, tiny_llm_dir
) -> None:
    published = tmp_path / "canary-like"
    published.mkdir()
    config = json.loads((saved_dir / "config.json").read_text())
    config["pretrained_llm"] = "Qwen/Qwen3-1.7B"  # a hub name, as in the published config.json
    (published / "config.json").write_text(json.dumps(config))
    shutil.copy(saved_dir / "model.safetensors", published / "model.safetensors")

    with pytest.raises(CheckpointError, match="Pass llm_path="):
        SALM.from_pretrained(published)
    loaded = SALM.from_pretrained(published, llm_path=tiny_llm_dir)
    assert torch.equal(loaded.perception.proj.weight, tiny_salm.perception.proj.weight)


def test_bf16_export_halves_the_file(tiny_salm, saved_dir, tmp_path) -> None:
    bf16_dir = tiny_salm.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(bf16_dir / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("perception.proj.weight").dtype == torch.bfloat16
    assert tiny_salm.perception.proj.weight.dtype == torch.float32  # the model itself is untouched
    ratio = (bf16_dir / "model.safetensors").stat().st_size / (saved_dir / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55


def test_shape_mismatch_names_the_offending_key(saved_dir, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    with safe_open(str(broken / "model.safetensors"), "pt") as weights:
        tensors = {k: weights.get_tensor(k) for k in weights.keys()}
    tensors["perception.proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="perception.proj.weight"):
        SALM.from_pretrained(broken)


def test_missing_keys_are_listed(saved_dir, tmp_path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(saved_dir, partial)
    with safe_open(str(partial / "model.safetensors"), "pt") as weights:
        tensors = {
            k: weights.get_tensor(k)
            for k in weights.keys()
            if not k.startswith("perception.encoder.layers.1.")
        }
    save_file(tensors, str(partial / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \(first: \['perception.encoder.layers.1"):
        SALM.from_pretrained(partial)


def test_directory_without_weights_is_rejected(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        SALM.from_pretrained(tmp_path)
