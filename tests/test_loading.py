"""`SALM.from_pretrained` / `load_pretrained`: every supported kind of saved model, and clear errors."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from tiny_asr import write_tiny_asr_nemo

from salm.errors import CheckpointError
from salm.io.loading import load_pretrained
from salm.model import SALM


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _nemo_lightning_checkpoint(cfg: dict, state_dict: dict, path):
    """A checkpoint written by Lightning's own Trainer for NeMo's own SALM, as the NeMo recipe saves it."""
    from lightning.pytorch import Trainer
    from nemo.collections.speechlm2 import SALM as NeMoSALM

    nemo = NeMoSALM(cfg)
    nemo.load_state_dict(state_dict, strict=True)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(nemo)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def nemo_cfg(tiny_salm) -> dict:
    cfg = OmegaConf.to_container(copy.deepcopy(tiny_salm.cfg), resolve=True)
    cfg["perception"]["output_dim"] = tiny_salm.llm.config.hidden_size  # NeMo needs it explicit
    return cfg


@pytest.fixture(scope="module")
def lightning_ckpt(tiny_salm, nemo_cfg, tmp_path_factory):
    return _nemo_lightning_checkpoint(
        nemo_cfg, tiny_salm.state_dict(), tmp_path_factory.mktemp("lightning") / "step=100.ckpt"
    )


def test_ray_train_checkpoint_dir_loads_its_consolidated_model(tiny_salm, tmp_path) -> None:
    checkpoint = tmp_path / "checkpoint_000003"
    tiny_salm.save_pretrained(checkpoint / "model")
    (checkpoint / "deepspeed").mkdir()
    (checkpoint / "train_state.json").write_text(json.dumps({"step": 3}))
    assert _same_weights(SALM.from_pretrained(checkpoint), tiny_salm)


def test_ray_checkpoint_without_consolidated_weights_is_explained(tmp_path) -> None:
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "train_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="consolidated weights were not written"):
        load_pretrained(tmp_path)


def test_nemo_lightning_checkpoint_loads_with_its_weights(tiny_salm, lightning_ckpt) -> None:
    assert _same_weights(load_pretrained(lightning_ckpt), tiny_salm)


def test_nemo_lightning_checkpoint_with_a_hub_llm_name_asks_for_llm_path(
    tiny_salm, nemo_cfg, tiny_llm_dir, tmp_path
) -> None:
    cfg = {**nemo_cfg, "pretrained_llm": str(tiny_llm_dir)}
    path = _nemo_lightning_checkpoint(cfg, tiny_salm.state_dict(), tmp_path / "hub.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["cfg"]["pretrained_llm"] = "Qwen/Qwen3-1.7B"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="Pass llm_path="):
        load_pretrained(path)
    assert _same_weights(load_pretrained(path, llm_path=tiny_llm_dir), tiny_salm)


def test_nemo_checkpoint_takes_its_encoder_config_from_the_asr_model(tiny_salm, nemo_cfg, tmp_path) -> None:
    asr = write_tiny_asr_nemo(tmp_path / "asr.nemo", d_model=64)
    checkpoint = torch.load(_lightning_ckpt_copy(tiny_salm, nemo_cfg, tmp_path), weights_only=True)
    cfg = checkpoint["hyper_parameters"]["cfg"]
    cfg.update(pretrained_asr="/cluster/models/asr.nemo", pretrained_weights=True)
    cfg["perception"]["encoder"] = {}  # NeMo's recipe saves only the user's overrides
    path = tmp_path / "from_asr.ckpt"
    torch.save({**checkpoint, "state_dict": _with_one_encoder_layer(checkpoint["state_dict"])}, path)

    with pytest.raises(CheckpointError, match="pass asr_path="):
        load_pretrained(path)
    model = load_pretrained(path, asr_path=asr)
    assert model.cfg.perception.encoder.n_layers == 1


def test_a_checkpoint_that_needs_unsafe_unpickling_is_refused_with_an_explanation(
    tiny_salm, nemo_cfg, tmp_path
) -> None:
    path = tmp_path / "dictconfig.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": OmegaConf.create(nemo_cfg)}}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*DictConfig.*re-save only its tensors"):
        load_pretrained(path)


def test_a_checkpoint_without_nemo_config_is_rejected(tmp_path) -> None:
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"no `hyper_parameters\['cfg'\]`"):
        load_pretrained(path)


def test_unknown_file_types_are_named(tmp_path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(CheckpointError, match="expected a .nemo file, a NeMo Lightning .ckpt"):
        load_pretrained(notes)


def test_missing_model_file_says_it_does_not_exist(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "model.nemo")


def test_distributed_checkpoint_dir_points_to_the_conversion_script(tmp_path) -> None:
    (tmp_path / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="to_hf.py"):
        load_pretrained(tmp_path)


def _lightning_ckpt_copy(tiny_salm, nemo_cfg, tmp_path):
    return _nemo_lightning_checkpoint(nemo_cfg, tiny_salm.state_dict(), tmp_path / "base.ckpt")


def _with_one_encoder_layer(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not k.startswith("perception.encoder.layers.1.")}
