"""`salm transcribe MODEL AUDIO...`: batched transcription with a saved model, one line per file."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("transcribe", help="transcribe audio files with a saved model")
    parser.add_argument("model", help="a .nemo file, HF-layout dir, Ray Train checkpoint dir or NeMo .ckpt")
    parser.add_argument("audio", nargs="+", help="audio files (any rate; resampled)")
    parser.add_argument("--llm-path", default=None, help="LLM config+tokenizer dir if the model carries none")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from salm.model import SALM

    model = SALM.from_pretrained(args.model, llm_path=args.llm_path).eval()
    for path, text in zip(
        args.audio, model.transcribe(args.audio, max_new_tokens=args.max_new_tokens), strict=True
    ):
        print(f"{path}\t{text}")
