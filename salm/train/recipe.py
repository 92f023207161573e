"""Recipes: NeMo-style YAML (``model:``, ``trainer:``, ``deepspeed:``, ``data:``, ``exp_manager:``)
with dotted ``key=value`` overrides from the command line, validated before any worker starts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from salm.errors import SALMConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

TRAINER_DEFAULTS = {
    "num_workers": 1,
    "use_gpu": False,
    "resources_per_worker": None,
    "precision": "32",  # "32" | "bf16" | "16" (NeMo's "bf16-true"/"bf16-mixed" are accepted as "bf16")
    "max_steps": 1000,
    "val_check_interval": 500,
    "log_every_n_steps": 10,
    "accumulate_grad_batches": 1,
    "gradient_clip_val": 1.0,
    "seed": 0,
    "log_prediction_train": True,
    "log_prediction_train_samples": 2,
    "log_prediction_train_interval": 50,
    "log_prediction_valid": True,
    "log_prediction_valid_samples": 2,
    "max_new_tokens": 64,
    "compile_layers": False,
    "compile_options": {},  # Inductor options for the compiled layers, e.g. {cpp_wrapper: true}
    "activation_checkpointing": False,  # true | encoder | llm | [encoder, llm]: recompute in the backward
    "pack_llm_sequences": False,  # the loss runs the LLM on the real positions only (salm/model/packing.py)
}
DEEPSPEED_DEFAULTS = {"zero_stage": 2, "offload_optimizer": False, "offload_param": False, "config": {}}
# DeepSpeed keys that other recipe fields set: `deepspeed.config` may not set them a second way.
RECIPE_OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "data.train_ds.batch_size",
    "train_micro_batch_size_per_gpu": "data.train_ds.batch_size",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "gradient_clipping": "trainer.gradient_clip_val",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_param",
}
EXP_MANAGER_DEFAULTS = {
    "exp_dir": "runs",
    "name": "salm",
    "checkpoint_every_n_steps": None,  # null: at every validation
    "save_top_k": 2,
    "resume_from_checkpoint": None,  # a checkpoint dir to start from (any world size) when the run has none
    "max_failures": 0,
    "always_save_nemo": False,
    "save_nemo_on_train_end": True,
}
# fused: torch's one-kernel AdamW (salm.train.deepspeed_setup.build_optimizer says why it is the default).
OPTIMIZER_DEFAULTS = {"lr": 5e-4, "betas": [0.9, 0.98], "weight_decay": 1e-3, "fused": True}
SCHEDULER_DEFAULTS = {"warmup_steps": 0, "min_lr": 0.0}


def resolve_config_path(config_name: str, config_path: str | None = None) -> Path:
    """``tiny`` -> ``salm/configs/tiny.yaml``; a path to a YAML file is taken as is."""
    candidates = [Path(config_name)]
    base = Path(config_path) if config_path else CONFIG_DIR
    candidates += [base / config_name, base / f"{config_name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise SALMConfigError(f"no recipe {config_name!r} (looked in {base}); bundled recipes: {known}")


def load_recipe(
    config_name: str, overrides: list[str] | None = None, config_path: str | None = None
) -> DictConfig:
    """Load a recipe, apply ``a.b.c=value`` overrides, fill defaults and validate."""
    cfg = OmegaConf.load(resolve_config_path(config_name, config_path))
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise SALMConfigError(f"overrides must look like key.path=value, got {bad}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as error:
        raise SALMConfigError(f"bad override: {error}") from error
    defaults = OmegaConf.create(
        {
            "trainer": TRAINER_DEFAULTS,
            "deepspeed": DEEPSPEED_DEFAULTS,
            "exp_manager": EXP_MANAGER_DEFAULTS,
            "model": {"optimizer": OPTIMIZER_DEFAULTS, "lr_scheduler": SCHEDULER_DEFAULTS},
        }
    )
    cfg = OmegaConf.merge(defaults, cfg)
    validate_recipe(cfg)
    return cfg


def validate_recipe(cfg: DictConfig) -> None:
    """Refuse unsupported or contradictory settings up front, naming the field."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SALMConfigError(f"the recipe leaves {', '.join(missing)} unset (???); set them with key=value")
    trainer, ds = cfg.trainer, cfg.deepspeed
    for key in (
        "num_workers",
        "max_steps",
        "val_check_interval",
        "log_every_n_steps",
        "accumulate_grad_batches",
    ):
        if int(trainer[key]) < 1:
            raise SALMConfigError(f"`trainer.{key}` must be >= 1, got {trainer[key]}")
    if float(trainer.get("aux_ctc_weight") or 0.0) < 0:
        raise SALMConfigError(
            f"`trainer.aux_ctc_weight` must be >= 0 (0 turns it off), got {trainer.aux_ctc_weight}"
        )
    if not isinstance(trainer.compile_layers, bool):
        raise SALMConfigError(
            f"`trainer.compile_layers` must be true or false, got {trainer.compile_layers!r}"
        )
    if not isinstance(trainer.pack_llm_sequences, bool):
        raise SALMConfigError(
            f"`trainer.pack_llm_sequences` must be true or false, got {trainer.pack_llm_sequences!r}"
        )
    if not isinstance(trainer.compile_options, Mapping):
        raise SALMConfigError(
            "`trainer.compile_options` must be a mapping of Inductor options (e.g. {cpp_wrapper: true}), "
            f"got {trainer.compile_options!r}"
        )
    if trainer.compile_options:
        from salm.model.compile import inductor_options_error  # imports torch: only when options are set

        if error := inductor_options_error(trainer.compile_options):
            raise SALMConfigError(f"`trainer.compile_options`: {error}")
    if trainer.activation_checkpointing not in (False, None):
        from salm.model.activation_checkpointing import checkpointed_parts  # imports torch: only when set

        checkpointed_parts(trainer.activation_checkpointing)
    if precision_of(cfg) not in ("32", "bf16", "16"):
        raise SALMConfigError(f"`trainer.precision` must be 32, bf16 or 16, got {trainer.precision!r}")
    if trainer.pack_llm_sequences and trainer.use_gpu and precision_of(cfg) == "32":
        raise SALMConfigError(
            "`trainer.pack_llm_sequences` on a GPU runs FlashAttention's varlen kernel, which computes in bf16 "
            "or fp16 only: set `trainer.precision=bf16`, or `trainer.pack_llm_sequences=false` for fp32"
        )
    if int(ds.zero_stage) not in (0, 1, 2, 3):
        raise SALMConfigError(f"`deepspeed.zero_stage` must be 0, 1, 2 or 3, got {ds.zero_stage}")
    if trainer.compile_layers and int(ds.zero_stage) == 3:
        raise SALMConfigError(
            "`trainer.compile_layers` works with `deepspeed.zero_stage` 0-2 only: ZeRO-3 gathers each "
            "layer's weights in module hooks that torch.compile would trace; set trainer.compile_layers=false"
        )
    if ds.offload_param and int(ds.zero_stage) != 3:
        raise SALMConfigError("`deepspeed.offload_param` needs `deepspeed.zero_stage=3`")
    if ds.offload_optimizer and int(ds.zero_stage) == 0:
        raise SALMConfigError("`deepspeed.offload_optimizer` needs `deepspeed.zero_stage` >= 1")
    extra = ds.get("config")
    if extra is None:
        extra = OmegaConf.create({})
    if not isinstance(extra, DictConfig):
        raise SALMConfigError(f"`deepspeed.config` must be a mapping of DeepSpeed config keys, got {extra!r}")
    for dotted, owner in RECIPE_OWNED_DEEPSPEED_KEYS.items():
        if OmegaConf.select(extra, dotted) is not None:
            raise SALMConfigError(f"`deepspeed.config.{dotted}` is set by `{owner}`; set it there instead")
    if float(cfg.model.optimizer.lr) <= 0:
        raise SALMConfigError(f"`model.optimizer.lr` must be > 0, got {cfg.model.optimizer.lr}")
    if not isinstance(cfg.model.optimizer.fused, bool):
        raise SALMConfigError(
            f"`model.optimizer.fused` must be true or false, got {cfg.model.optimizer.fused!r}"
        )
    if int(cfg.exp_manager.save_top_k) < 1:
        raise SALMConfigError(f"`exp_manager.save_top_k` must be >= 1, got {cfg.exp_manager.save_top_k}")


def precision_of(cfg: DictConfig) -> str:
    """Normalise NeMo/Lightning spellings (``bf16-true``, ``bf16-mixed``, ``32-true``, 16) to 32 / bf16 / 16."""
    value = str(cfg.trainer.precision).lower()
    return {"bf16-true": "bf16", "bf16-mixed": "bf16", "32-true": "32", "16-mixed": "16", "fp32": "32"}.get(
        value, value
    )


def save_resolved(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the fully resolved recipe next to the run, so every run can be reproduced."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.resolved.yaml"
    OmegaConf.save(cfg, path, resolve=True)
    return path
