"""`salm eval`: WER (S/D/I), token accuracy, loss and RTFx of a saved model on a labelled set.

Per batch (rows sorted by duration, longest first) the model transcribes the audio, then scores
the reference transcript teacher-forced (loss and next-token accuracy on the answer tokens).
RTFx = audio seconds / seconds spent transcribing (audio decoding + generation; model loading
and the teacher-forced pass are not counted), summed over workers. Writes
``predictions.jsonl`` (the manifest fields + ``pred_text``, per-utterance ``wer`` and loss) and
``metrics.json``.

Small sets run in this process; ``--ray`` runs Ray Data ``map_batches`` over model actors (one
GPU each when the cluster has GPUs, CPU actors otherwise). The model path must be readable
from every node.

Input is a NeMo manifest (``--manifest``) or a Lhotse Shar directory (``--shar``, e.g. the
output of ``salm data prepare``). Shar rows keep their audio encoded, as stored in the shard tars,
and are decoded batch by batch; broken cuts are skipped with one log line each, as in training.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from salm.audio import collate_audio, load_audio
from salm.errors import SALMConfigError
from salm.generate import (
    GenerationOptions,
    add_generation_arguments,
    add_model_arguments,
    compile_for_inference,
    duration_batches,
    generation_options,
    load_model_for_inference,
    read_manifest,
    ready_for_inference,
    write_jsonl,
)
from salm.metrics import WerResult, normalize_text, token_accuracy, word_error_rate


@dataclass(frozen=True)
class EvalReport:
    """Corpus-level results of one evaluation."""

    num_utterances: int
    audio_seconds: float
    wer: WerResult
    normalized: bool
    token_accuracy: float | None  # None when the loss pass was skipped
    loss: float | None
    transcribe_seconds: float
    wall_seconds: float

    @property
    def rtfx(self) -> float:
        return self.audio_seconds / self.transcribe_seconds if self.transcribe_seconds else float("inf")

    def as_dict(self) -> dict:
        return {
            "num_utterances": self.num_utterances,
            "audio_seconds": self.audio_seconds,
            **self.wer.as_dict(),
            "normalized": self.normalized,
            "token_accuracy": self.token_accuracy,
            "loss": self.loss,
            "rtfx": self.rtfx,
            "transcribe_seconds": self.transcribe_seconds,
            "wall_seconds": self.wall_seconds,
        }

    def describe(self) -> str:
        w = self.wer
        parts = [
            f"WER {w.wer:.2%} (S {w.substitutions}, D {w.deletions}, I {w.insertions} / {w.ref_words} words"
            f"{', normalized' if self.normalized else ''})",
            f"RTFx {self.rtfx:.1f} ({self.audio_seconds:.1f} audio-s in {self.transcribe_seconds:.1f} s)",
        ]
        if self.loss is not None:
            parts.insert(1, f"token accuracy {self.token_accuracy:.2%}, loss {self.loss:.4f}")
        return " | ".join(parts) + f" | {self.num_utterances} utterances, wall {self.wall_seconds:.1f} s"


# ----- one batch (runs in this process or inside a Ray actor) -----
def row_audio(row: dict, sampling_rate: int):
    """A row's waveform: encoded bytes from a Shar shard, or the manifest's audio file."""
    if "audio_bytes" in row:
        from salm.data.processing import decode_audio

        return decode_audio(row["audio_bytes"], sampling_rate)
    return load_audio(row["audio_filepath"], sampling_rate)


def row_key(row: dict) -> str:
    """What identifies a row in the input: the manifest's audio path or the Shar cut id."""
    return row["audio_filepath"] if "audio_filepath" in row else row["id"]


@torch.inference_mode()
def score_batch(model, rows: list[dict], options: GenerationOptions, compute_loss: bool = True) -> list[dict]:
    """Transcribe ``rows`` in one batch; add ``pred_text``, ``transcribe_seconds`` and loss stats."""
    started = time.perf_counter()
    audios, audio_lens = collate_audio([row_audio(r, model.sampling_rate) for r in rows])
    prompt = options.prompt_for(model.audio_locator_tag)
    prompts = [[{"role": "user", "content": prompt}] for _ in rows]
    texts = model.generate(prompts, audios=audios, audio_lens=audio_lens, **options.generate_kwargs()).texts
    seconds = time.perf_counter() - started
    batch_audio = sum(float(r["duration"]) for r in rows)
    scored = [
        {**row, "pred_text": text, "transcribe_seconds": seconds * float(row["duration"]) / batch_audio}
        for row, text in zip(rows, texts, strict=True)
    ]
    if compute_loss:
        stats = teacher_forced_stats(model, audios, audio_lens, prompt, [r["text"] for r in rows])
        for row, (loss_sum, targets, correct) in zip(scored, stats, strict=True):
            row.update(loss_sum=loss_sum, target_tokens=targets, correct_tokens=correct)
    return scored


def teacher_forced_stats(
    model, audios: torch.Tensor, audio_lens: torch.Tensor, prompt: str, texts: list[str]
) -> list[tuple[float, int, int]]:
    """Per example: summed cross-entropy, number of answer tokens, correctly predicted answer tokens.

    ``SALM.loss`` reduces over the batch; evaluation wants per-utterance numbers (to find the
    worst utterances), so the LM head runs here at the target positions and sums per row.
    """
    from salm.model.llm import base_causal_lm
    from salm.model.placeholders import IGNORE_INDEX

    dialogs = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": t}] for t in texts]
    encoded = [model.prompt_format.encode_dialog(d) for d in dialogs]
    device = model.device
    batch = {
        "audios": audios.to(device),
        "audio_lens": audio_lens.to(device),
        "input_ids": nn.utils.rnn.pad_sequence(
            [e.input_ids for e in encoded],
            batch_first=True,
            padding_value=model.text_pad_id,
            padding_side="left",
        ).to(device),
        "loss_mask": nn.utils.rnn.pad_sequence(
            [e.loss_mask for e in encoded], batch_first=True, padding_value=False, padding_side="left"
        ).to(device),
    }
    inputs = model.prepare_inputs(batch)
    causal_lm = base_causal_lm(model.llm)
    hidden = causal_lm.model(
        inputs_embeds=inputs["input_embeds"], attention_mask=inputs["attention_mask"], use_cache=False
    ).last_hidden_state  # (B, T, H)
    targets = inputs["target_ids"]  # (B, T)
    is_target = targets != IGNORE_INDEX
    logits = causal_lm.lm_head(hidden[is_target]).float()  # (num_targets, V)
    target_ids = targets[is_target]
    row_of = is_target.nonzero()[:, 0]
    losses = nn.functional.cross_entropy(logits, target_ids, reduction="none")
    loss_sum = torch.zeros(len(texts), device=device).index_add_(0, row_of, losses)
    correct = torch.zeros(len(texts), device=device).index_add_(
        0, row_of, (logits.argmax(dim=-1) == target_ids).float()
    )
    counts = is_target.sum(dim=1)
    return [
        (float(loss), int(count), int(right))
        for loss, count, right in zip(loss_sum.tolist(), counts.tolist(), correct.tolist(), strict=True)
    ]


# ----- whole sets -----
def evaluate_rows(
    model, rows: list[dict], options: GenerationOptions, batch_size: int, compute_loss: bool = True
) -> list[dict]:
    """All rows in this process, batch by batch, with a progress bar in audio seconds."""
    scored: list[dict] = []
    with tqdm(total=sum(float(r["duration"]) for r in rows), unit="audio-s", desc="evaluating") as bar:
        for batch in duration_batches(rows, batch_size):
            scored += score_batch(model, batch, options, compute_loss)
            bar.update(sum(float(r["duration"]) for r in batch))
    return scored


class ScoringActor:
    """A Ray Data actor holding one model; ``__call__`` scores one batch (a pandas DataFrame)."""

    def __init__(
        self,
        model_path: str,
        load_kwargs: dict,
        options: GenerationOptions,
        compute_loss: bool,
        dtype: str = "auto",
        compile_model: bool = False,
    ):
        from salm.io.loading import load_pretrained

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = ready_for_inference(load_pretrained(model_path, **load_kwargs), device, dtype)
        if compile_model:
            compile_for_inference(self.model, options)
        self.options = options
        self.compute_loss = compute_loss

    def __call__(self, batch):
        import pandas as pd

        rows = batch.to_dict("records")
        return pd.DataFrame(score_batch(self.model, rows, self.options, self.compute_loss))


def evaluate_on_ray(
    model_path: str,
    rows: list[dict],
    options: GenerationOptions,
    batch_size: int,
    compute_loss: bool = True,
    num_actors: int = 1,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = 1.0,
    load_kwargs: dict | None = None,
    dtype: str = "auto",
    compile_model: bool = False,
) -> list[dict]:
    """All rows through Ray Data ``map_batches`` on ``num_actors`` model actors.

    ``gpus_per_actor=None`` gives each actor one GPU when the cluster has any, else CPU actors.
    ``dtype``: the actors' weights (``salm.generate.inference_dtype``); ``compile_model``: each actor
    compiles its model first (``salm.generate.compile_for_inference``).
    Rows enter sorted by duration, so each batch holds clips of similar length.
    """
    import ray

    if num_actors <= 0:
        raise SALMConfigError(f"--num-actors must be > 0, got {num_actors}")
    if not ray.is_initialized():
        ray.init()
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    ordered = [row for batch in duration_batches(rows, batch_size) for row in batch]
    dataset = ray.data.from_items(ordered).map_batches(
        ScoringActor,
        fn_constructor_kwargs={
            "model_path": str(model_path),
            "load_kwargs": load_kwargs or {},
            "options": options,
            "compute_loss": compute_loss,
            "dtype": dtype,
            "compile_model": compile_model,
        },
        batch_size=batch_size,
        batch_format="pandas",
        concurrency=num_actors,
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
    )
    return dataset.take_all()


def summarize(scored: list[dict], normalize: bool, wall_seconds: float) -> tuple[EvalReport, list[dict]]:
    """Corpus metrics, and the rows with per-utterance ``wer`` (and ``loss``) added."""
    rows = []
    for row in scored:
        row = {k: v for k, v in row.items() if k != "audio_bytes"}  # predictions.jsonl holds text only
        row["wer"] = word_error_rate([row["text"]], [row["pred_text"]], normalize).wer
        if normalize:
            row["pred_text_normalized"] = normalize_text(row["pred_text"])
        if row.get("target_tokens"):
            row["loss"] = row["loss_sum"] / row["target_tokens"]
        rows.append(row)
    with_loss = all("loss_sum" in r for r in rows)
    targets = sum(int(r["target_tokens"]) for r in rows) if with_loss else 0
    report = EvalReport(
        num_utterances=len(rows),
        audio_seconds=sum(float(r["duration"]) for r in rows),
        wer=word_error_rate([r["text"] for r in rows], [r["pred_text"] for r in rows], normalize),
        normalized=normalize,
        token_accuracy=token_accuracy(sum(int(r["correct_tokens"]) for r in rows), targets)
        if with_loss
        else None,
        loss=sum(float(r["loss_sum"]) for r in rows) / max(1, targets) if with_loss else None,
        transcribe_seconds=sum(float(r["transcribe_seconds"]) for r in rows),
        wall_seconds=wall_seconds,
    )
    return report, rows


def read_rows(args: argparse.Namespace) -> list[dict]:
    """Labelled rows to evaluate, from ``--manifest`` or ``--shar``."""
    if args.shar:
        return read_shar_rows(args.shar)
    rows = read_manifest(args.manifest)
    unlabelled = [r["audio_filepath"] for r in rows if not isinstance(r.get("text"), str)]
    if unlabelled:
        raise SALMConfigError(
            f"{len(unlabelled)} manifest rows have no `text` (first: {unlabelled[0]}); evaluation needs "
            "references. Use `salm generate` for unlabelled audio."
        )
    return rows


def read_shar_rows(shar_dir: str) -> list[dict]:
    """``id``, encoded ``audio_bytes``, ``duration`` and ``text`` of every readable cut, in shard order.

    The shards are read with the training pipeline's reader (``salm.data.shar_source``), so the
    same cuts count as broken: they are logged, counted and left out, and never stop the run.
    """
    from salm.data.shar_source import SkipLog, iter_shard, list_shards

    try:
        shards = list_shards(shar_dir)
    except SALMConfigError as error:
        raise SALMConfigError(str(error).replace("`data.shar_path` entry", "`--shar`")) from None
    skips = SkipLog()
    rows, skipped = [], 0
    for shard in tqdm(shards, unit="shard", desc="reading Shar", disable=len(shards) < 2):
        for raw in iter_shard(shard, skips):
            skipped += raw["skipped"]  # cuts skipped since the previous row
            rows.append({key: raw[key] for key in ("id", "audio_bytes", "duration", "text")})
    skipped += skips.take()[0]
    if skipped:
        print(
            f"skipped {skipped} broken cut(s) in {shar_dir} (logged above); evaluating the other {len(rows)}"
        )
    if not rows:
        raise SALMConfigError(f"`--shar` {shar_dir!r} holds no readable labelled cut; see the warnings above")
    return rows


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval", help="WER, token accuracy, loss and RTFx on a labelled manifest or Shar directory"
    )
    add_eval_arguments(parser)
    parser.set_defaults(func=run)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="NeMo manifest: audio_filepath, duration, text")
    source.add_argument(
        "--shar", help="Lhotse Shar directory with transcripts (e.g. from `salm data prepare`)"
    )
    parser.add_argument("--out-dir", default="runs/eval", help="where predictions.jsonl and metrics.json go")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--no-normalize", action="store_true", help="score raw text (default: Whisper English normalizer)"
    )
    parser.add_argument("--no-loss", action="store_true", help="skip the teacher-forced loss/accuracy pass")
    ray_group = parser.add_argument_group("Ray Data (large sets)")
    ray_group.add_argument("--ray", action="store_true", help="run on Ray Data with model actors")
    ray_group.add_argument("--num-actors", type=int, default=1)
    ray_group.add_argument(
        "--gpus-per-actor", type=float, default=None, help="default: 1 if the cluster has GPUs"
    )
    ray_group.add_argument("--cpus-per-actor", type=float, default=1.0)
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> EvalReport:
    options = generation_options(args)
    rows = read_rows(args)
    started = time.perf_counter()
    if args.ray:
        load_kwargs = {"llm_path": args.llm_path, "tokenizer_path": args.tokenizer_path}
        scored = evaluate_on_ray(
            args.model,
            rows,
            options,
            args.batch_size,
            compute_loss=not args.no_loss,
            num_actors=args.num_actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
            load_kwargs=load_kwargs,
            dtype=args.dtype,
            compile_model=args.compile,
        )
    else:
        model = load_model_for_inference(args)
        if args.compile:
            compile_for_inference(model, options)
        started = time.perf_counter()  # loading and compiling the model are not the evaluation's wall time
        scored = evaluate_rows(model, rows, options, args.batch_size, compute_loss=not args.no_loss)
    report, predictions = summarize(
        scored, normalize=not args.no_normalize, wall_seconds=time.perf_counter() - started
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "predictions.jsonl").open("w") as sink:
        position = {row_key(row): index for index, row in enumerate(rows)}
        write_jsonl(sorted(predictions, key=lambda r: position[row_key(r)]), sink)  # input order
    (out_dir / "metrics.json").write_text(json.dumps(report.as_dict(), indent=2))
    print(report.describe())
    print(f"predictions -> {out_dir / 'predictions.jsonl'}; metrics -> {out_dir / 'metrics.json'}")
    return report
