"""Checkpoints: DeepSpeed state (exact resume, same world size) + the full model in the HF layout
(resume at any world size, export, serving), reported through ``ray.train.report``.

Layout of one checkpoint directory::

    deepspeed/        DeepSpeed engine state of every rank (module, optimizer, LR schedule)
    model/            config.json + model.safetensors + llm_backbone/ (salm.io.hf_layout)
    model.nemo        only with exp_manager.always_save_nemo (salm.io.nemo_file)
    train_state.json  {"step": ..., "world_size": ..., "metrics": {...}}
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import ray.train
import torch

from salm.io.hf_layout import load_weights, save_hf_layout
from salm.model.salm import SALM

DEEPSPEED_DIR = "deepspeed"
MODEL_DIR = "model"
STATE_FILE = "train_state.json"
NEMO_FILE = "model.nemo"
TAG = "engine"  # not "latest": DeepSpeed writes a file of that name


def _gathered(model: torch.nn.Module, zero_stage: int):
    """Under ZeRO-3 parameters are sharded: gather them (on every rank) to write a full copy."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def save_and_report(
    engine, model: SALM, step: int, metrics: dict, zero_stage: int, with_nemo: bool = False
) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 adds the full model (and a ``model.nemo`` when
    ``with_nemo``: ``exp_manager.always_save_nemo``); Ray merges the files."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    with tempfile.TemporaryDirectory(prefix="salm-ckpt-") as tmp:
        tmp_path = Path(tmp)
        engine.save_checkpoint(str(tmp_path / DEEPSPEED_DIR), tag=TAG, client_state={"step": step})
        with _gathered(model, zero_stage):
            if rank == 0:
                save_hf_layout(model, tmp_path / MODEL_DIR)
                if with_nemo:
                    from salm.io.nemo_file import save_nemo

                    save_nemo(model, tmp_path / NEMO_FILE)
        if rank == 0:
            state = {"step": step, "world_size": world_size, "metrics": metrics}
            (tmp_path / STATE_FILE).write_text(json.dumps(state, indent=2))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def read_train_state(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / STATE_FILE).read_text())


def load_model_weights(model: SALM, checkpoint_dir: Path) -> None:
    """Consolidated weights into a model not yet wrapped by DeepSpeed (resume at another world size)."""
    load_weights(model, checkpoint_dir / MODEL_DIR / "model.safetensors")


def load_engine_state(engine, checkpoint_dir: Path) -> int:
    """Restore module, optimizer and LR schedule exactly; returns the step to continue from."""
    _, client_state = engine.load_checkpoint(str(checkpoint_dir / DEEPSPEED_DIR), tag=TAG)
    return int(client_state["step"])
