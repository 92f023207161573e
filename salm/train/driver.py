"""The driver side of a training run: datasets, ``TorchTrainer`` and what happens after ``fit``.

Runs wherever ``ray job submit`` (or the CLI) starts it; the heavy work happens in Ray Data
tasks and in the Ray Train workers (``salm.train.loop``). Re-running with the same
``exp_manager.exp_dir``/``name`` resumes from the run's latest checkpoint (Ray Train restores it).
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
import ray.train
from omegaconf import DictConfig, OmegaConf
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from salm.errors import SALMConfigError
from salm.train.data_feed import build_datasets
from salm.train.loop import train_loop_per_worker
from salm.train.recipe import save_resolved


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(str(cfg.exp_manager.exp_dir)).resolve() / str(cfg.exp_manager.name)


def ensure_ray() -> str:
    """Join ``RAY_ADDRESS`` (or the job's cluster) if set, else start a local Ray instance (dashboard on).

    Returns the dashboard address (``host:port``), where jobs and Serve configs are submitted.
    """
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        address = os.environ.get("RAY_ADDRESS")
        # A local instance gets at least 4 logical CPUs: 2 train workers plus the Ray Data read
        # tasks (an infinite stream holds its CPU) would otherwise wait for each other forever.
        context = ray.init(
            address=address,
            num_cpus=None if address else max(4, os.cpu_count() or 1),
            include_dashboard=True,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
        )
        return context.dashboard_url
    return ray._private.worker.get_dashboard_url()


def build_trainer(cfg: DictConfig) -> TorchTrainer:
    # Ray Train re-routes worker prints through its logger, which shows every log line twice on
    # the driver; plain prints keep the aligned logs readable. Ray propagates this to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer_cfg, exp = cfg.trainer, cfg.exp_manager
    run_dir = run_dir_of(cfg)
    resources = (
        OmegaConf.to_container(trainer_cfg.resources_per_worker) if trainer_cfg.resources_per_worker else None
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"recipe": OmegaConf.to_container(cfg, resolve=True)},
        scaling_config=ScalingConfig(
            num_workers=int(trainer_cfg.num_workers),
            use_gpu=bool(trainer_cfg.use_gpu),
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(
                num_to_keep=int(exp.save_top_k),
                checkpoint_score_attribute="val_wer",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=int(exp.max_failures)),
        ),
        datasets=build_datasets(cfg),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def check_resume_checkpoint(cfg: DictConfig) -> None:
    """``exp_manager.resume_from_checkpoint`` must be a checkpoint of ours (workers read it directly)."""
    path = cfg.exp_manager.get("resume_from_checkpoint")
    if path and not (Path(str(path)) / "train_state.json").exists():
        raise SALMConfigError(
            f"`exp_manager.resume_from_checkpoint` is {path!r}, which is not a salm-ray checkpoint directory "
            "(no train_state.json); point it at a checkpoint_* directory of an earlier run"
        )


def run_training(cfg: DictConfig) -> ray.train.Result:
    """Train; returns Ray's ``Result`` (``best_checkpoints`` sorted by val_wer)."""
    check_resume_checkpoint(cfg)
    ensure_ray()
    run_dir = run_dir_of(cfg)
    config_file = save_resolved(cfg, run_dir)
    print(f"run directory: {run_dir}\nresolved config: {config_file}", flush=True)
    result = build_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    best = best_checkpoint_dir(result)
    print(f"best checkpoint (by val_wer): {best}", flush=True)
    if cfg.exp_manager.save_nemo_on_train_end and best is not None:
        export_nemo(best, run_dir / "final.nemo")
    return result


def best_checkpoint_dir(result: ray.train.Result) -> Path | None:
    scored = [(m.get("val_wer", float("inf")), c) for c, m in result.best_checkpoints or []]
    if not scored:
        return Path(result.checkpoint.path) if result.checkpoint else None
    return Path(min(scored, key=lambda item: item[0])[1].path)


def export_nemo(checkpoint_dir: Path, out_file: Path) -> Path:
    """The end-of-training ``.nemo`` (self-contained: loads with no network and no source dirs)."""
    from salm.io.nemo_file import save_nemo
    from salm.model import SALM

    model = SALM.from_pretrained(checkpoint_dir / "model")
    save_nemo(model, out_file)
    print(f".nemo written: {out_file}", flush=True)
    return out_file
