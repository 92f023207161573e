"""Training on a real local Ray cluster: 2 DeepSpeed workers on generated speech in Lhotse Shar.

One module-scoped corpus (train + held-out Shar) feeds several short runs: a first run that must
learn, a resumed run, a run that loses a worker, a run on another world size, and a ZeRO-3 run of
packed sequences through checkpointed layers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from salm.assets.synthetic_speech import make_sentences, synthesize_corpus, write_nemo_manifest

VOICES = ["kal16", "slt", "rms", "awb"]


@pytest.fixture(scope="module")
def shar_corpus(tmp_path_factory, ray_local) -> dict[str, Path]:
    from salm.data.prepare import prepare_shar

    root = tmp_path_factory.mktemp("corpus")
    sentences = make_sentences(56, seed=11)
    train = synthesize_corpus(root / "wav_train", sentences[:48], VOICES)
    heldout = synthesize_corpus(root / "wav_heldout", sentences[48:], ["kal16", "slt"])
    paths = {}
    for name, utterances, shard_size in (("train", train, 12), ("heldout", heldout, 8)):
        manifest = write_nemo_manifest(utterances, root / f"{name}.jsonl")
        prepare_shar([str(manifest)], str(root / f"shar_{name}"), shard_size=shard_size, progress=False)
        paths[name] = root / f"shar_{name}"
    return paths


def recipe(shar_corpus: dict[str, Path], tiny_llm_dir: Path, exp_dir: Path, name: str, *overrides: str):
    from salm.train.recipe import load_recipe

    return load_recipe(
        "tiny",
        [
            f"model.pretrained_llm={tiny_llm_dir}",
            f"data.train_ds.shar_path={shar_corpus['train']}",
            "data.train_ds.batch_size=4",
            "data.train_ds.shuffle=true",
            f"data.validation_ds.datasets.heldout.shar_path={shar_corpus['heldout']}",
            "data.validation_ds.batch_size=4",
            "trainer.num_workers=2",
            "trainer.max_steps=24",
            "trainer.val_check_interval=12",
            "trainer.log_every_n_steps=4",
            "trainer.log_prediction_train_interval=12",
            "trainer.max_new_tokens=8",
            "model.optimizer.lr=5e-3",
            "model.lr_scheduler.warmup_steps=4",
            "exp_manager.save_nemo_on_train_end=false",
            "exp_manager.save_top_k=5",
            f"exp_manager.exp_dir={exp_dir}",
            f"exp_manager.name={name}",
            *overrides,
        ],
    )


def _losses(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"step +\d+/\d+ \| loss ([0-9.]+)", output)]


@pytest.fixture(scope="module")
def base_run(shar_corpus, tiny_llm_dir, tmp_path_factory):
    """One 24-step run on 2 workers that later tests resume from; its output is kept for checks."""
    import io
    from contextlib import redirect_stdout

    from salm.train.driver import run_training

    exp_dir = tmp_path_factory.mktemp("runs")
    capture = io.StringIO()
    with redirect_stdout(capture):
        result = run_training(recipe(shar_corpus, tiny_llm_dir, exp_dir, "base"))
    return {"result": result, "exp_dir": exp_dir, "driver_output": capture.getvalue()}


def test_two_workers_learn_validate_log_and_checkpoint(base_run, capfd) -> None:
    result, exp_dir = base_run["result"], base_run["exp_dir"]
    output = capfd.readouterr()
    text = base_run["driver_output"] + output.out + output.err
    losses = _losses(text)
    assert len(losses) >= 6, text[-3000:]
    assert min(losses[-2:]) < losses[0] - 0.15, f"training loss did not fall: {losses}"
    assert result.metrics["val_wer"] >= 0.0 and "val_wer_heldout" in result.metrics
    assert 0.0 <= result.metrics["val_acc_heldout"] <= 1.0
    # prediction log blocks with real counts: "Audio Token : <|audioplaceholder|> -> [audio_embeddings] (N)"
    blocks = re.findall(
        r"Full LLM Input : .*\((\d+)\)\n.*Prompt +: .*\((\d+)\)\n.*Audio Token +: .* \((\d+)\)", text
    )
    assert blocks, "no prediction log block"
    assert any("Training Sample 1" in line for line in text.splitlines())
    assert any("Validation [heldout] Sample 1" in line for line in text.splitlines())
    checkpoint = Path(result.checkpoint.path)
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == 24 and state["world_size"] == 2
    assert (checkpoint / "model" / "model.safetensors").exists()
    assert (checkpoint / "deepspeed").is_dir()
    assert (exp_dir / "base" / "config.resolved.yaml").exists()


def test_rerun_with_more_steps_resumes_where_it_stopped(base_run, shar_corpus, tiny_llm_dir, capfd) -> None:
    from salm.train.driver import run_training

    capfd.readouterr()
    first_losses = _losses(base_run["driver_output"])
    result = run_training(
        recipe(shar_corpus, tiny_llm_dir, base_run["exp_dir"], "base", "trainer.max_steps=28")
    )
    text = capfd.readouterr().out
    assert "resumed from step 24" in text
    steps = [int(s) for s in re.findall(r"step +(\d+)/28 \|", text)]
    assert steps and min(steps) > 24, f"the resumed run restarted at step {steps[:1]}"
    assert result.metrics["step"] == 28
    if first_losses:
        assert _losses(text)[-1] < first_losses[0], "the resumed run did not continue the loss curve"


def train_on_one_worker(
    shar_corpus: dict[str, Path], tiny_llm_dir: Path, exp_dir: Path, name: str, *overrides: str
):
    """``salm train`` of the tiny recipe (``recipe``) on one Ray Train worker; returns Ray's result."""
    from salm.train.driver import run_training

    return run_training(recipe(shar_corpus, tiny_llm_dir, exp_dir, name, "trainer.num_workers=1", *overrides))


def test_other_world_size_resumes_from_consolidated_weights_with_activation_checkpointing(
    base_run, shar_corpus, tiny_llm_dir, tmp_path, capfd
) -> None:
    checkpoint = base_run["result"].checkpoint.path  # step 24, written by 2 workers
    capfd.readouterr()
    result = train_on_one_worker(
        shar_corpus,
        tiny_llm_dir,
        tmp_path,
        "elastic",
        "trainer.max_steps=30",
        f"exp_manager.resume_from_checkpoint={checkpoint}",
        "trainer.activation_checkpointing=true",  # changes no weights: the checkpoint loads as it is
    )
    text = capfd.readouterr().out
    assert "checkpoint was written by 2 workers, this run has 1" in text
    assert re.search(r"activation checkpointing: \d+ layers recompute", text)
    steps = [int(s) for s in re.findall(r"step +(\d+)/30 \|", text)]
    assert steps and min(steps) > 24
    assert result.metrics["step"] == 30


def test_zero3_trains_packed_sequences_with_every_layer_checkpointed(
    shar_corpus, tiny_llm_dir, tmp_path, capfd
) -> None:
    """ZeRO-3 gathers each submodule's partitioned weights in its forward hooks, and the checkpoint's
    recompute calls the layer's forward again in the backward, under the packed loss's attention
    (``trainer.pack_llm_sequences``: the LLM runs the batch's real positions only, so the step log's
    padding share of the positions computed is 0). The three must work together."""
    capfd.readouterr()
    result = train_on_one_worker(
        shar_corpus,
        tiny_llm_dir,
        tmp_path,
        "zero3_packed_checkpointed",
        "trainer.max_steps=8",
        "trainer.val_check_interval=8",
        "deepspeed.zero_stage=3",
        "trainer.activation_checkpointing=true",
        "trainer.pack_llm_sequences=true",
    )
    text = capfd.readouterr().out
    assert re.search(r"activation checkpointing: \d+ layers recompute", text)
    pads = re.findall(r"\| pad ([0-9.]+)% \|", text)
    assert pads and all(float(pad) == 0.0 for pad in pads), pads
    losses = _losses(text)
    assert len(losses) >= 2 and losses[-1] < losses[0], f"no learning: {losses}"
    assert result.metrics["step"] == 8


def test_killed_worker_is_replaced_and_training_finishes(shar_corpus, tiny_llm_dir, tmp_path, capfd) -> None:
    from ray.util.state import list_actors

    from salm.train.driver import run_training

    run_dir = tmp_path / "failover"
    killed: list[int] = []

    def kill_one_worker_after_first_checkpoint() -> None:
        deadline = time.time() + 600
        # The snapshot is written once Ray Train has registered the checkpoint (the directory
        # itself appears earlier, while it is still being reported).
        while time.time() < deadline and not (run_dir / "checkpoint_manager_snapshot.json").exists():
            time.sleep(0.5)
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].pid)  # a training worker of this run, mid-training

    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, daemon=True)
    killer.start()
    # 60 steps with a checkpoint every 12: the kill lands mid-run even when the state API is slow.
    result = run_training(
        recipe(
            shar_corpus,
            tiny_llm_dir,
            tmp_path,
            "failover",
            "exp_manager.max_failures=1",
            "trainer.max_steps=60",
            "trainer.log_prediction_train=false",
            "trainer.log_prediction_valid=false",
        )
    )
    killer.join(timeout=5)
    text = capfd.readouterr().out
    assert killed, "no worker was killed"
    assert re.search(r"resumed from step (12|24|36|48) ", text), text[-4000:]
    assert result.metrics["step"] == 60


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_training_with_what_to_change(loss: float) -> None:
    from salm.train.loop import check_finite_loss

    check_finite_loss({"loss": 0.25}, step=10)  # a finite loss passes
    with pytest.raises(FloatingPointError, match=r"at step 10: the run diverged.*model.optimizer.lr"):
        check_finite_loss({"loss": loss}, step=10)
