"""The per-worker training function that Ray Train runs: one DeepSpeed engine per worker.

Reads top to bottom: build the model (same seed on every rank), restore a checkpoint if Ray
hands one over, wrap in DeepSpeed, then step until ``max_steps`` with periodic logging,
validation, prediction logs and checkpoints. Supported: ZeRO 0-3, optimizer/parameter offload,
fp32/bf16/fp16, gradient accumulation and clipping. Not supported: pipeline or tensor
parallelism (the model is data-parallel only).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from omegaconf import DictConfig, OmegaConf

from salm.model.activation_checkpointing import use_activation_checkpointing
from salm.model.compile import compile_repeated_layers
from salm.model.salm import SALM
from salm.train import checkpointing
from salm.train.batch_device import prefetch_pinned, to_device, with_layouts
from salm.train.data_feed import train_batches, validation_batches
from salm.train.engine import build_model, wrap_in_deepspeed
from salm.train.prediction_log import SampleTokens, format_block
from salm.train.step_metrics import StepMeter
from salm.train.validation import validate
from salm.train.worker_errors import sendable_errors


@sendable_errors
def train_loop_per_worker(config: dict) -> None:
    """Entry point for ``TorchTrainer(train_loop_per_worker=...)``; ``config["recipe"]`` is the recipe."""
    cfg: DictConfig = OmegaConf.create(config["recipe"])
    # Ray Train logs one "Reporting training result ..." line per report at INFO: too noisy.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    is_chief = rank == 0
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    zero_stage = int(cfg.deepspeed.zero_stage)

    model = build_model(cfg, device)

    step, exact_resume_dir = 0, None
    checkpoint = ray.train.get_checkpoint()  # this run's latest (after a restart or a re-run)
    if checkpoint is not None:
        checkpoint_dir = Path(checkpoint.to_directory())
    elif cfg.exp_manager.get("resume_from_checkpoint"):
        checkpoint_dir = Path(str(cfg.exp_manager.resume_from_checkpoint))  # another run's, on shared storage
    else:
        checkpoint_dir = None
    if checkpoint_dir is not None:
        state = checkpointing.read_train_state(checkpoint_dir)
        if state["world_size"] == world_size:
            exact_resume_dir = checkpoint_dir
        else:
            if is_chief:
                print(
                    f"WARNING: checkpoint was written by {state['world_size']} workers, this run has {world_size}: "
                    "resuming from the consolidated weights with a fresh optimizer state (LR schedule continues)",
                    flush=True,
                )
            checkpointing.load_model_weights(model, checkpoint_dir)
            step = int(state["step"])

    engine, scheduler = wrap_in_deepspeed(cfg, model, device, start_step=step)
    model.pack_llm_sequences = cfg.trainer.pack_llm_sequences  # the loss's LLM call (salm/model/packing.py)
    checkpointed = use_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    if checkpointed and is_chief:
        print(
            f"activation checkpointing: {checkpointed} layers recompute their forward in the backward",
            flush=True,
        )
    if is_chief and model.perception.frame_counts(torch.tensor([model.sampling_rate])) is None:
        print(
            "NOTE: this encoder's frame counts cannot be computed on the host (salm/model/batch_layout.py), "
            "so each training step waits for the GPU 4 times to size the loss's gathers; same numbers",
            flush=True,
        )
    if cfg.trainer.compile_layers:  # after checkpointing: the compiled region is the checkpointed forward
        compiled = compile_repeated_layers(model, cfg.trainer.compile_options)
        if is_chief:
            print(
                f"compiling {compiled} repeated layers (torch.compile): the first step takes minutes",
                flush=True,
            )
    if exact_resume_dir is not None:
        step = checkpointing.load_engine_state(engine, exact_resume_dir)
        if is_chief:
            print(f"resumed from step {step} (DeepSpeed state: module, optimizer, LR schedule)", flush=True)

    trainer_cfg, exp = cfg.trainer, cfg.exp_manager
    max_steps = int(trainer_cfg.max_steps)
    val_every = int(trainer_cfg.val_check_interval)
    ckpt_every = int(exp.checkpoint_every_n_steps or val_every)
    accumulate = int(trainer_cfg.accumulate_grad_batches)
    batches = prefetch_pinned(  # collated and laid out ahead in a thread, pinned so the copy to the GPU is asynchronous
        with_layouts(
            train_batches(cfg, model.text_pad_id, model.token_equivalent_duration, seed_offset=step), model
        ),
        device,
    )
    meter = StepMeter(run_name=str(exp.name), world_size=world_size)
    last_checkpoint_step = step if checkpoint_dir is not None else -1
    metrics_log = (
        Path(str(exp.exp_dir)).resolve() / str(exp.name) / "metrics.jsonl"
    )  # shared storage, like checkpoints

    while step < max_steps:
        for _ in range(accumulate):
            waiting = time.perf_counter()
            batch = next(batches, None)
            data_wait_seconds = time.perf_counter() - waiting
            if batch is None:  # only a finite stream ends; all ranks read the same number of batches
                raise RuntimeError("the training data ran out before max_steps; use an infinite train_ds")
            audio_seconds = (
                float(batch["audio_lens"].sum()) / model.sampling_rate
            )  # host copy: no device sync
            batch = to_device(batch, engine.device)
            started = time.perf_counter()
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            meter.add(out, audio_seconds, time.perf_counter() - started, data_wait_seconds)
        step += 1

        if step % int(trainer_cfg.log_every_n_steps) == 0 or step == max_steps:
            metrics = meter.flush(
                step, lr=scheduler.get_last_lr()[0], grad_norm=engine.get_global_grad_norm()
            )
            check_finite_loss(metrics, step)
            if is_chief:
                print(meter.describe(metrics, max_steps), flush=True)
        else:
            metrics = None
        if (
            is_chief
            and trainer_cfg.log_prediction_train
            and step % int(trainer_cfg.log_prediction_train_interval) == 0
        ):
            log_training_predictions(model, batch, out, int(trainer_cfg.log_prediction_train_samples))

        validate_now = step % val_every == 0 or step == max_steps
        if validate_now:
            val_metrics = validate(
                model,
                validation_batches(cfg, model.text_pad_id),
                prompt=str(cfg.data.prompt),
                max_new_tokens=int(trainer_cfg.max_new_tokens),
                synced_gpus=zero_stage == 3,
                log_samples=int(trainer_cfg.log_prediction_valid_samples)
                if trainer_cfg.log_prediction_valid and is_chief
                else 0,
            )
            if is_chief:
                print(
                    f"validation @ step {step}: "
                    + ", ".join(f"{k}={v:.4f}" for k, v in sorted(val_metrics.items())),
                    flush=True,
                )
            metrics = {**(metrics or meter.last), **val_metrics, "step": step}
        if is_chief and metrics is not None:
            with metrics_log.open("a") as sink:  # one JSON line per logged step: curves without a dashboard
                sink.write(
                    json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}) + "\n"
                )
        if validate_now and (step % ckpt_every == 0 or step == max_steps):
            checkpointing.save_and_report(
                engine, model, step, metrics, zero_stage, with_nemo=bool(exp.always_save_nemo)
            )
            last_checkpoint_step = step
        elif metrics is not None:
            ray.train.report(metrics)
    if last_checkpoint_step != step and is_chief:
        print(f"finished at step {step} without a final checkpoint", flush=True)


def check_finite_loss(metrics: dict[str, float], step: int) -> None:
    """Stop a diverged run at the first logged step with a non-finite loss.

    The recipes may turn off DeepSpeed's per-step bf16 overflow scan (``deepspeed.config.bf16.
    check_grad_overflow: false``, as torch and Lightning bf16 do: it costs a pass over every
    gradient); this check, on numbers already on the host, is what notices divergence instead.
    """
    loss = metrics.get("loss", 0.0)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss is {loss} at step {step}: the run diverged. Resume from the last "
            "checkpoint with a lower `model.optimizer.lr`, more `model.lr_scheduler.warmup_steps` "
            "or `trainer.gradient_clip_val` set"
        )


def log_training_predictions(model: SALM, batch: dict, out: dict, samples: int) -> None:
    """Teacher-forced argmax of the last batch, shown as aligned blocks."""
    counts = out["targets_per_example"].tolist()
    prefix = model.prompt_format.inference_prefix
    prefix_ids = model.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    predicted = out["predicted_ids"].tolist()
    offset = 0
    for row, count in enumerate(counts):
        if row >= samples:
            break
        ids = predicted[offset : offset + count]
        offset += count
        answer_start = len(
            prefix_ids
        )  # the answer turn's markup (e.g. "<|im_start|>assistant\n") is a target too
        input_ids = batch["input_ids"][row]
        keep = (input_ids != model.text_pad_id).cumsum(0) > 0
        sample = SampleTokens(
            input_ids=input_ids[keep].tolist(),
            answer_ids=input_ids[batch["loss_mask"][row]].tolist(),
            predicted_ids=ids,
            audio_frames=int(out["audio_frames"][row]),
            reference=batch["texts"][row],
            hypothesis=model.tokenizer.decode(ids[answer_start:], skip_special_tokens=True).strip(),
        )
        print(
            format_block("Training", row + 1, sample, model.tokenizer, model.audio_locator_tag_id), flush=True
        )
