"""`salm generate`: audio files or a NeMo manifest -> transcripts JSONL, with prompt and decoding options.

Rows are processed longest first in batches of similar duration (little padding; an
out-of-memory batch shows up at once rather than at the end). The same row/batch helpers serve
`salm eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from tqdm import tqdm

from salm.errors import AudioLoadError, SALMConfigError
from salm.model.config import asr_prompt

DECODING = ("greedy", "beam", "sample")


INFERENCE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class GenerationOptions:
    """Prompt and decoding settings shared by `salm generate` and `salm eval`."""

    prompt: str | None = None  # None: canary's ``asr_prompt`` around the model's audio_locator_tag
    max_new_tokens: int = 128
    decoding: str = "greedy"
    num_beams: int = 4
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.decoding not in DECODING:
            raise SALMConfigError(f"--decoding must be one of {', '.join(DECODING)}, got {self.decoding!r}")
        if self.max_new_tokens <= 0:
            raise SALMConfigError(f"--max-new-tokens must be > 0, got {self.max_new_tokens}")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``SALM.generate``."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens}
        if self.decoding == "beam":
            kwargs["num_beams"] = self.num_beams
        elif self.decoding == "sample":
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def prompt_for(self, audio_locator_tag: str) -> str:
        prompt = self.prompt or asr_prompt(audio_locator_tag)
        if prompt.count(audio_locator_tag) != 1:
            raise SALMConfigError(f"--prompt must contain {audio_locator_tag} exactly once, got {prompt!r}")
        return prompt


# ----- rows: one dict per utterance, NeMo manifest fields -----
def read_manifest(path: str | Path) -> list[dict]:
    """NeMo manifest (JSON lines with ``audio_filepath``, ``duration``, ``text``) -> rows.

    Relative audio paths are resolved against the manifest's directory, as NeMo does; a missing
    ``duration`` is read from the audio file's header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SALMConfigError(f"{path}:{number} is not valid JSON: {error}") from error
            if "audio_filepath" not in row:
                raise SALMConfigError(f"{path}:{number} has no `audio_filepath`")
            audio = Path(row["audio_filepath"])
            row["audio_filepath"] = str(audio if audio.is_absolute() else path.parent / audio)
            rows.append(with_duration(row))
    if not rows:
        raise SALMConfigError(f"manifest {str(path)!r} holds no utterances")
    return rows


def audio_rows(paths: list[str | Path]) -> list[dict]:
    """Audio file paths -> rows with their durations."""
    return [with_duration({"audio_filepath": str(p)}) for p in paths]


def with_duration(row: dict) -> dict:
    if row.get("duration") is None:
        from lhotse import Recording

        path = Path(row["audio_filepath"])
        if not path.is_file():
            raise AudioLoadError(f"audio file {str(path)!r} does not exist")
        row["duration"] = Recording.from_file(path).duration
    return row


def duration_batches(rows: list[dict], batch_size: int) -> list[list[dict]]:
    """Rows sorted longest first and cut into batches of ``batch_size``."""
    if batch_size <= 0:
        raise SALMConfigError(f"--batch-size must be > 0, got {batch_size}")
    ordered = sorted(rows, key=lambda r: -float(r["duration"]))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def write_jsonl(rows: list[dict], sink: IO[str]) -> None:
    for row in rows:
        sink.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# ----- generation -----
def transcribe_rows(model, rows: list[dict], options: GenerationOptions, batch_size: int) -> Iterator[dict]:
    """Yield each row with ``pred_text`` added, batch by batch (longest audio first)."""
    prompt = options.prompt_for(model.audio_locator_tag)
    batches = duration_batches(rows, batch_size)
    with tqdm(total=sum(float(r["duration"]) for r in rows), unit="audio-s", desc="generating") as bar:
        for batch in batches:
            prompts = [[{"role": "user", "content": prompt, "audio": r["audio_filepath"]}] for r in batch]
            texts = model.generate(prompts, **options.generate_kwargs()).texts
            for row, text in zip(batch, texts, strict=True):
                yield {**row, "pred_text": text}
            bar.update(sum(float(r["duration"]) for r in batch))


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Prompt and decoding flags (shared with `salm eval`)."""
    group = parser.add_argument_group("prompt and decoding")
    group.add_argument(
        "--prompt", default=None, help="user prompt with the audio placeholder (default: canary's)"
    )
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--decoding", choices=DECODING, default="greedy")
    group.add_argument("--num-beams", type=int, default=4, help="with --decoding beam")
    group.add_argument("--temperature", type=float, default=1.0, help="with --decoding sample")
    group.add_argument("--top-p", type=float, default=1.0, help="with --decoding sample")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a .nemo file, HF-layout dir, Ray Train checkpoint dir or NeMo .ckpt")
    parser.add_argument(
        "--llm-path", default=None, help="LLM config + tokenizer dir if the model carries none"
    )
    parser.add_argument("--tokenizer-path", default=None, help="tokenizer dir overriding the model's")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=INFERENCE_DTYPES,
        help="the weights' dtype; auto: bfloat16 on a GPU (as Serve replicas run), float32 on the CPU; "
        "the mel front end stays float32",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the encoder's layers, and on a GPU the greedy decoding step, before the first batch, "
        "as Serve replicas do (minutes once; the same transcripts, faster on large sets)",
    )


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        decoding=args.decoding,
        num_beams=args.num_beams,
        temperature=args.temperature,
        top_p=args.top_p,
    )


def load_model_for_inference(args: argparse.Namespace):
    """The model named on the command line, in eval mode, on ``--device`` in ``--dtype``, with
    inference's encoder layout."""
    import torch

    from salm.io.loading import load_pretrained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(args.model, llm_path=args.llm_path, tokenizer_path=args.tokenizer_path)
    return ready_for_inference(model, device, args.dtype)


def compile_for_inference(model, options: GenerationOptions) -> None:
    """``--compile``: the encoder's Conformer layers, and on a GPU the greedy decoding step and prefill,
    compiled before the first batch with the Serve replica's own functions (``salm.inference_compile``), so a
    GPU evaluation runs the server's setup. What was compiled, and any failure (that part then runs
    eagerly: same transcripts, slower), is said on stderr."""
    import time

    from salm.inference_compile import compile_decoding_now, compile_encoder_now, compile_prefill_now

    started = time.perf_counter()
    compiled = []
    failure = compile_encoder_now(model, options.prompt_for(model.audio_locator_tag))
    if failure is None:
        compiled.append("the encoder's layers")
    else:
        print(f"--compile: compiling the encoder failed ({failure}); it runs eagerly", file=sys.stderr)
    if options.decoding != "greedy":
        uncompiled = (
            f"only greedy decoding has a compiled step; --decoding {options.decoding} runs uncompiled"
        )
        print(f"--compile: {uncompiled}", file=sys.stderr)
    elif model.device.type != "cuda":
        print(
            "--compile: the decoding step and the prefill compile on a GPU only; on the CPU they run eagerly",
            file=sys.stderr,
        )
    else:
        for part, compile_now in (
            ("the greedy decoding step", compile_decoding_now),
            ("the prefill", compile_prefill_now),
        ):
            if (failure := compile_now(model, options.max_new_tokens)) is None:
                compiled.append(part)
            else:
                print(f"--compile: compiling {part} failed ({failure}); it runs eagerly", file=sys.stderr)
    done = " and ".join(compiled) or "nothing"
    print(f"--compile: {done} compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def inference_dtype(device: str, dtype: str = "auto"):
    """The torch dtype of ``dtype`` (one of ``INFERENCE_DTYPES``); ``auto`` is bfloat16 on a GPU,
    where it is fast, and float32 on the CPU, which runs float32 faster than bfloat16."""
    import torch

    if dtype not in INFERENCE_DTYPES:
        raise SALMConfigError(f"dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return getattr(torch, dtype)


def on_device_for_inference(model, device: str, dtype: str = "auto"):
    """``model`` in eval mode on ``device`` in ``dtype`` (``inference_dtype``), the mel front end in
    float32 (log-mel of a bf16 waveform loses most of its resolution, as NeMo keeps it)."""
    model = model.eval().to(device=device, dtype=inference_dtype(device, dtype))
    model.perception.preprocessor.float()
    return model


def ready_for_inference(model, device: str, dtype: str = "auto"):
    """``on_device_for_inference``, with inference's encoder layout (same numbers, no cost per new
    input length; ``salm.model.perception.INFERENCE_ENCODER_LAYOUT``)."""
    from salm.model.perception import INFERENCE_ENCODER_LAYOUT

    model.perception.set_encoder_layout(**INFERENCE_ENCODER_LAYOUT)
    return on_device_for_inference(model, device, dtype)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="transcribe audio files or a manifest into JSONL")
    add_model_arguments(parser)
    parser.add_argument("audio", nargs="*", help="audio files (any rate; resampled)")
    parser.add_argument("--manifest", default=None, help="NeMo manifest (JSON lines) instead of audio files")
    parser.add_argument("--out", default=None, help="output JSONL (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=16)
    add_generation_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if bool(args.audio) == bool(args.manifest):
        raise SALMConfigError("give either audio files or --manifest (one of them)")
    options = generation_options(args)
    rows = read_manifest(args.manifest) if args.manifest else audio_rows(args.audio)
    model = load_model_for_inference(args)
    if args.compile:
        compile_for_inference(model, options)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") if args.out else nullcontext(sys.stdout) as sink:
        for row in transcribe_rows(model, rows, options, args.batch_size):
            write_jsonl([row], sink)
    if args.out:
        print(f"{len(rows)} transcripts -> {args.out}", file=sys.stderr)
