"""Recipes, overrides, DeepSpeed config and LR schedule: checked before any worker starts."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from salm.errors import SALMConfigError
from salm.train.deepspeed_setup import build_optimizer, deepspeed_config, warmup_cosine
from salm.train.recipe import load_recipe, save_resolved

FILLED = ["model.pretrained_llm=/llm", "data.train_ds.shar_path=/shar"]


def test_bundled_recipes_load_and_overrides_apply() -> None:
    cfg = load_recipe("tiny", [*FILLED, "trainer.max_steps=7", "deepspeed.zero_stage=3"])
    assert cfg.trainer.max_steps == 7 and cfg.deepspeed.zero_stage == 3
    canary = load_recipe("salm_canary_qwen_2.5b", [*FILLED, "model.pretrained_asr=/asr.nemo"])
    assert canary.model.lora.r == 128 and canary.model.lora.lora_alpha == 256
    assert canary.model.perception.encoder.n_layers == 32 and canary.model.perception.output_dim == 2048
    assert canary.model.optimizer.lr == 5e-4 and list(canary.model.optimizer.betas) == [0.9, 0.98]
    assert canary.model.lr_scheduler.warmup_steps == 1000 and canary.trainer.precision == "bf16"
    assert canary.trainer.compile_layers is True and cfg.trainer.compile_layers is False
    assert dict(canary.trainer.compile_options) == {"cpp_wrapper": True} and not cfg.trainer.compile_options


def test_the_canary_recipe_configures_its_training_batches() -> None:
    """The README's and the RayJob's canary command give only paths: the recipe must size batches."""
    from salm.train.data_feed import _data_config

    canary = load_recipe("salm_canary_qwen_2.5b", [*FILLED, "model.pretrained_asr=/asr.nemo"])
    train = _data_config(canary, "data.train_ds")
    assert train.use_bucketing and train.batch_duration == 640.0 and train.max_duration == 40.0
    with pytest.raises(SALMConfigError, match="the batch size is not configured"):
        _data_config(canary, "data.train_ds", batch_duration=None)


def test_unset_mandatory_values_are_named() -> None:
    with pytest.raises(SALMConfigError, match="data.train_ds.shar_path"):
        load_recipe("tiny", ["model.pretrained_llm=/llm"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("deepspeed.zero_stage=4", "`deepspeed.zero_stage` must be 0, 1, 2 or 3, got 4"),
        ("deepspeed.offload_param=true", "`deepspeed.offload_param` needs `deepspeed.zero_stage=3`"),
        ("trainer.precision=fp8", "`trainer.precision` must be 32, bf16 or 16"),
        ("trainer.max_steps=0", "`trainer.max_steps` must be >= 1, got 0"),
        (
            "trainer.compile_layers=sometimes",
            "`trainer.compile_layers` must be true or false, got 'sometimes'",
        ),
        (
            "trainer.compile_options=cpp_wrapper",
            "`trainer.compile_options` must be a mapping of Inductor options",
        ),
        (
            "trainer.compile_options.cpp_wraper=true",
            "`trainer.compile_options`: not Inductor options: cpp_wraper",
        ),
        (
            "trainer.compile_options.cpp_wrapper=sometimes",
            "`trainer.compile_options`: Unexpected type of attr cpp_wrapper, got str should be bool",
        ),
        (
            "trainer.pack_llm_sequences=sometimes",
            "`trainer.pack_llm_sequences` must be true or false, got 'sometimes'",
        ),
        (
            "trainer.activation_checkpointing=decoder",
            "`trainer.activation_checkpointing` must be false, true (every repeated layer), encoder, llm",
        ),
        ("model.optimizer.lr=0", "`model.optimizer.lr` must be > 0"),
        ("trainer.max_steps", "overrides must look like key.path=value"),
    ],
)
def test_bad_settings_are_refused_with_the_field_name(override: str, message: str) -> None:
    with pytest.raises(SALMConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe("tiny", [*FILLED, override])


def test_packing_on_a_gpu_in_fp32_is_refused_before_the_workers_start() -> None:
    """FlashAttention has no fp32 kernel: without this check the first step fails after minutes of
    compiling. On the CPU (dense-mask attention) and in bf16 the same setting loads."""
    packed = [*FILLED, "trainer.pack_llm_sequences=true"]
    with pytest.raises(SALMConfigError, match="set `trainer.precision=bf16`"):
        load_recipe("tiny", [*packed, "trainer.use_gpu=true", "trainer.precision=32"])
    assert load_recipe(
        "tiny", [*packed, "trainer.use_gpu=true", "trainer.precision=bf16"]
    ).trainer.pack_llm_sequences
    assert load_recipe(
        "tiny", [*packed, "trainer.use_gpu=false", "trainer.precision=32"]
    ).trainer.pack_llm_sequences


def test_unknown_recipe_lists_bundled_ones() -> None:
    with pytest.raises(SALMConfigError, match="salm_canary_qwen_2.5b, tiny"):
        load_recipe("nope")


def test_resolved_config_is_saved(tmp_path) -> None:
    cfg = load_recipe("tiny", FILLED)
    path = save_resolved(cfg, tmp_path / "run")
    assert OmegaConf.load(path).trainer.max_steps == cfg.trainer.max_steps


def test_deepspeed_config_reflects_the_recipe() -> None:
    cfg = load_recipe(
        "tiny",
        [
            *FILLED,
            "trainer.precision=bf16-true",
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
            "deepspeed.offload_param=true",
            "trainer.accumulate_grad_batches=4",
            "trainer.gradient_clip_val=0.5",
        ],
    )
    ds = deepspeed_config(cfg)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_allow_untested_optimizer"] is True


def test_deepspeed_config_passes_extra_keys_through_and_refuses_owned_ones() -> None:
    cfg = load_recipe(
        "tiny",
        [
            *FILLED,
            "trainer.precision=bf16",
            "deepspeed.config.timers.throughput.enabled=false",
            "deepspeed.config.bf16.check_grad_overflow=false",
            "deepspeed.config.zero_optimization.reduce_bucket_size=50000000",
        ],
    )
    ds = deepspeed_config(cfg)
    assert ds["timers"] == {"throughput": {"enabled": False}}
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}  # merged, not replaced
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 50000000}
    with pytest.raises(
        SALMConfigError, match=r"deepspeed.config.zero_optimization.stage.*deepspeed.zero_stage"
    ):
        load_recipe("tiny", [*FILLED, "deepspeed.config.zero_optimization.stage=3"])
    with pytest.raises(SALMConfigError, match="must be a mapping"):
        load_recipe("tiny", [*FILLED, "deepspeed.config=5"])


def test_warmup_then_cosine_to_min_lr() -> None:
    cfg = load_recipe(
        "tiny",
        [
            *FILLED,
            "trainer.max_steps=110",
            "model.lr_scheduler.warmup_steps=10",
            "model.optimizer.lr=1e-3",
            "model.lr_scheduler.min_lr=1e-5",
        ],
    )
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([param], cfg)
    scheduler = warmup_cosine(optimizer, cfg)
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[9:], lrs[10:], strict=False))


def test_compiled_layers_are_refused_under_zero3() -> None:
    with pytest.raises(
        SALMConfigError, match="`trainer.compile_layers` works with `deepspeed.zero_stage` 0-2"
    ):
        load_recipe("tiny", [*FILLED, "trainer.compile_layers=true", "deepspeed.zero_stage=3"])
