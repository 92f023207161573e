"""`salm quickstart`: the whole platform end to end on one small machine, offline.

1. synthesise a speech corpus (flite/espeak-ng voices, a fixed sentence grammar; held-out
   sentences and a held-out voice for evaluation) and write it as Lhotse Shar (`salm data prepare`);
2. score the untrained model on the held-out set (the baseline);
3. train the tiny SALM with 2 Ray Train workers through DeepSpeed, as production does;
4. export the best checkpoint to `.nemo` and evaluate it (WER, RTFx); plot loss/WER curves;
5. deploy the `.nemo` with Ray Serve and transcribe a held-out clip over HTTP;
6. print where everything is and what to run next.

Re-running reuses the corpus and Shar shards (and resumes a finished run instead of retraining).
Ctrl-C stops Ray and Serve: nothing is left running. Joins ``RAY_ADDRESS`` when set.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from salm.assets.synthetic_speech import make_sentences, synthesize_corpus, write_nemo_manifest
from salm.assets.tiny_llm import write_tiny_qwen3
from salm.model.config import asr_prompt

TRAIN_VOICES = ("kal16", "slt", "rms", "awb", "espeak:en-us", "espeak:en")
HELDOUT_VOICES = ("kal",)  # never heard in training (and 8 kHz: resampled on the way in)
FLITE_16K_VOICES = ("kal16", "slt", "rms", "awb")
PROMPT = asr_prompt()

# The GPU preset's SALM: FastConformer 6 x 256 and a Qwen3 4 x 256 (random, all trained),
# sized to learn the corpus in a few minutes on one H100.
SMALL_LLM = {
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 1024,
}
SMALL_MODEL_OVERRIDES = [
    "model.perception.encoder.n_layers=6",
    "model.perception.encoder.d_model=256",
    "model.perception.encoder.subsampling_conv_channels=256",
    "model.perception.modality_adapter.d_model=256",
]
ONE_GPU_OVERRIDES = [
    "trainer.use_gpu=true",
    "trainer.num_workers=1",
    "trainer.resources_per_worker={GPU: 1, CPU: 4}",
    "trainer.precision=bf16",
    "data.train_ds.num_workers=4",
]


@dataclass
class QuickstartSize:
    """How big the run is: the default fits in ~15 minutes on 2 cores, ``smoke`` in ~3, ``gpu`` one H100."""

    train_utterances: int = 900
    heldout_utterances: int = 40
    max_steps: int = 400
    val_check_interval: int = 100
    train_voices: tuple[str, ...] = TRAIN_VOICES
    heldout_voices: tuple[str, ...] = HELDOUT_VOICES
    llm: dict | None = None  # write_tiny_qwen3 sizes; None: the tiny default
    overrides: tuple[str, ...] = ()  # recipe overrides on top of the quickstart's own

    @classmethod
    def smoke(cls) -> QuickstartSize:
        return cls(train_utterances=48, heldout_utterances=8, max_steps=12, val_check_interval=6)

    @classmethod
    def gpu(cls) -> QuickstartSize:
        """One GPU: 3000 utterances of the four 16 kHz flite voices; held out: 200 unseen sentences
        spoken by those voices (no espeak-ng, which the GPU image lacks; no unseen voice)."""
        return cls(
            train_utterances=3000,
            heldout_utterances=200,
            max_steps=1500,
            val_check_interval=500,
            train_voices=FLITE_16K_VOICES,
            heldout_voices=FLITE_16K_VOICES,
            llm=SMALL_LLM,
            overrides=(
                *SMALL_MODEL_OVERRIDES,
                *ONE_GPU_OVERRIDES,
                "data.train_ds.batch_size=32",
                "data.validation_ds.batch_size=50",
                "model.optimizer.lr=1e-3",
                "model.lr_scheduler.warmup_steps=200",
                "trainer.log_every_n_steps=50",
                "trainer.log_prediction_train_interval=500",
            ),
        )

    def describe_heldout(self) -> str:
        if set(self.heldout_voices) & set(self.train_voices):
            return "unseen sentences, training voices"
        return "unseen sentences, unseen voice"


def _step(index: int, total: int, text: str) -> None:
    print(f"\n[{index}/{total}] {text}", flush=True)


def make_corpus(workdir: Path, size: QuickstartSize) -> dict[str, Path]:
    """Synthesise speech, write NeMo manifests and Lhotse Shar; reuses what exists."""
    from salm.data.prepare import prepare_shar

    sentences = make_sentences(size.train_utterances + size.heldout_utterances, seed=7)
    train = synthesize_corpus(
        workdir / "speech" / "train", sentences[: size.train_utterances], list(size.train_voices)
    )
    heldout = synthesize_corpus(
        workdir / "speech" / "heldout", sentences[size.train_utterances :], list(size.heldout_voices)
    )
    paths = {}
    for name, utterances in (("train", train), ("heldout", heldout)):
        manifest = write_nemo_manifest(utterances, workdir / "manifests" / f"{name}.jsonl")
        shar_dir = workdir / "shar" / name
        if not any(shar_dir.glob("cuts.*.jsonl.gz")):
            summary = prepare_shar([str(manifest)], str(shar_dir), shard_size=100)
            print(summary.describe())
        paths[f"{name}_manifest"], paths[f"{name}_shar"] = manifest, shar_dir
    return paths


def recipe(workdir: Path, llm_dir: Path, paths: dict[str, Path], size: QuickstartSize):
    from salm.train.recipe import load_recipe

    return load_recipe(
        "tiny",
        [
            f"model.pretrained_llm={llm_dir}",
            f"data.train_ds.shar_path={paths['train_shar']}",
            f"data.validation_ds.datasets.heldout.shar_path={paths['heldout_shar']}",
            f"trainer.max_steps={size.max_steps}",
            f"trainer.val_check_interval={size.val_check_interval}",
            f"exp_manager.exp_dir={workdir / 'runs'}",
            "exp_manager.name=tiny",
            # The tiny LLM is random: there is nothing in it to preserve, and a frozen random LM
            # head learns far too slowly. Train all of it (LoRA is for pretrained LLMs).
            "model.lora=null",
            "model.freeze_params=[]",
            "model.optimizer.lr=3e-3",
            # A random encoder: the LLM loss alone never finds the audio (see salm/train/aux_ctc.py).
            "trainer.aux_ctc_weight=0.5",
            *size.overrides,
        ],
    )


def evaluate(model_path: Path, manifest: Path, out_dir: Path) -> dict:
    """`salm eval` on the held-out manifest; returns its metrics.json."""
    from salm.cli import build_parser

    args = build_parser().parse_args(
        [
            "eval",
            str(model_path),
            "--manifest",
            str(manifest),
            "--out-dir",
            str(out_dir),
            "--max-new-tokens",
            "32",
        ]
    )
    args.func(args)
    return json.loads((out_dir / "metrics.json").read_text())


def plot_curves(metrics_file: Path, out_file: Path, untrained_wer: float) -> Path:
    """Training loss and held-out WER against steps, one PNG next to the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_wer"]) for r in rows if "val_wer" in r]
    figure, (loss_axis, wer_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([s for s, _ in train], [v for _, v in train], marker=".")
    loss_axis.set(title="training loss", xlabel="step", ylabel="cross-entropy / answer token")
    wer_axis.plot([0] + [s for s, _ in val], [untrained_wer] + [v for _, v in val], marker="o")
    wer_axis.set(
        title="held-out WER (greedy)", xlabel="step", ylabel="WER", ylim=(0, max(1.05, untrained_wer))
    )
    figure.tight_layout()
    figure.savefig(out_file, dpi=100)
    plt.close(figure)
    return out_file


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_transcribe(model_file: Path, clip: Path, dashboard_url: str) -> str:
    """Deploy `serve/config.yaml` with this model, send one clip over HTTP, print request and answer."""
    from serve.client import TranscriptionClient
    from serve.config_file import load_serve_config
    from serve.deploy import deploy_and_wait

    port = _free_port()
    config = load_serve_config(
        model=model_file, overrides=[f"http_options.port={port}", "http_options.host=127.0.0.1"]
    )
    deploy_and_wait(config, dashboard_url)
    url = f"http://127.0.0.1:{port}"
    print(f"POST {url}/v1/audio/transcriptions  file=@{clip.name}  model=salm  response_format=json")
    with TranscriptionClient(url) as client:
        text = client.transcribe(clip)
    print(f"-> 200 {json.dumps({'text': text})}")
    return text


def run_quickstart(workdir: str | Path = "runs/quickstart", size: QuickstartSize | None = None) -> dict:
    """Run every step under ``workdir``; returns the paths and numbers of the summary."""
    from ray import serve

    from salm.model import SALM
    from salm.train.driver import best_checkpoint_dir, ensure_ray, run_training

    size = size or QuickstartSize()
    workdir = Path(workdir).resolve()
    started = time.time()
    total = 6
    _step(
        1,
        total,
        f"speech corpus: {size.train_utterances} train + {size.heldout_utterances} held-out utterances -> Shar",
    )
    dashboard_url = ensure_ray()
    llm_dir = write_tiny_qwen3(workdir / "tiny_llm", **(size.llm or {}))
    paths = make_corpus(workdir, size)
    cfg = recipe(workdir, llm_dir, paths, size)

    _step(2, total, "untrained model on the held-out set (the baseline)")
    import torch

    torch.manual_seed(int(cfg.trainer.seed))  # the same initial weights training starts from
    untrained_dir = SALM(OmegaConf.to_container(cfg.model, resolve=True)).save_pretrained(
        workdir / "untrained"
    )
    untrained = evaluate(untrained_dir, paths["heldout_manifest"], workdir / "eval" / "untrained")

    trainer = cfg.trainer
    _step(
        3,
        total,
        f"training the SALM: {trainer.num_workers} Ray Train {'GPU' if trainer.use_gpu else 'CPU'} worker(s) x "
        f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}, {size.max_steps} steps",
    )
    train_started = time.time()
    run_dir = workdir / "runs" / "tiny"
    result = run_training(cfg)
    best = best_checkpoint_dir(result)
    train_minutes = (time.time() - train_started) / 60
    nemo_file = run_dir / "final.nemo"

    _step(4, total, f"evaluating {nemo_file.name} on the held-out set ({size.describe_heldout()})")
    trained = evaluate(nemo_file, paths["heldout_manifest"], workdir / "eval" / "trained")
    plot = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", untrained["wer"])

    _step(5, total, "serving the .nemo with Ray Serve and transcribing a held-out clip over HTTP")
    clip = Path(json.loads(paths["heldout_manifest"].read_text().splitlines()[0])["audio_filepath"])
    try:
        answer = serve_and_transcribe(nemo_file, clip, dashboard_url)
    finally:
        serve.shutdown()

    _step(6, total, f"done in {(time.time() - started) / 60:.1f} min")
    summary = {
        "untrained_wer": untrained["wer"],
        "heldout_wer": trained["wer"],
        "rtfx": trained.get("rtfx"),
        "heldout": size.describe_heldout(),
        "train_minutes": train_minutes,
        "train_utterances": size.train_utterances,
        "heldout_utterances": size.heldout_utterances,
        "served_answer": answer,
        "run_dir": str(run_dir),
        "checkpoint": str(best),
        "nemo": str(nemo_file),
        "plot": str(plot),
        "logs": str(run_dir / "metrics.jsonl"),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"held-out WER: untrained {untrained['wer']:.1%} -> trained {trained['wer']:.1%}   "
        f"RTFx {trained.get('rtfx', float('nan')):.1f}\n"
        f"run:        {run_dir}\ncheckpoint: {best}\n.nemo:      {nemo_file}\nplot:       {plot}\n"
        f"metrics:    {run_dir / 'metrics.jsonl'}\npredictions: {workdir / 'eval' / 'trained' / 'predictions.jsonl'}\n"
        "next:\n"
        "  salm train --config-name tiny model.pretrained_llm=... data.train_ds.shar_path=... trainer.max_steps=5000\n"
        "  ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/train.py "
        "--config-name salm_canary_qwen_2.5b ...\n"
        "  salm serve runs/quickstart/runs/tiny/final.nemo      # KubeRay: cluster/README.md"
    )
    return summary


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("quickstart", help="run the platform end to end on this machine (offline)")
    parser.add_argument("--workdir", default="runs/quickstart")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--smoke", action="store_true", help="a ~3-minute version with a tiny corpus and 12 steps"
    )
    preset.add_argument(
        "--gpu",
        action="store_true",
        help="one GPU: a small SALM (FastConformer 6x256, Qwen3 4x256) on 3000 flite utterances, 1500 steps",
    )
    parser.set_defaults(func=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> dict:
    size = QuickstartSize.smoke() if args.smoke else QuickstartSize.gpu() if args.gpu else None
    return run_quickstart(args.workdir, size)
