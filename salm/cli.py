"""The `salm` command line. Each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import sys

from salm.errors import AudioLoadError, CheckpointError, PromptError, SALMConfigError

USER_ERRORS = (SALMConfigError, AudioLoadError, PromptError, CheckpointError, FileNotFoundError)


def _quickstart(args: argparse.Namespace) -> None:
    from salm.quickstart import run_quickstart

    run_quickstart(args.workdir, num_clips=args.num_clips)


def _transcribe(args: argparse.Namespace) -> None:
    from salm.model import SALM

    model = SALM.from_pretrained(args.model, llm_path=args.llm_path).eval()
    for path, text in zip(args.audio, model.transcribe(args.audio, max_new_tokens=args.max_new_tokens)):
        print(f"{path}\t{text}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    quickstart = commands.add_parser("quickstart", help="run the platform end to end on this machine")
    quickstart.add_argument("--workdir", default="runs/quickstart")
    quickstart.add_argument("--num-clips", type=int, default=6)
    quickstart.set_defaults(func=_quickstart)

    transcribe = commands.add_parser("transcribe", help="transcribe audio files with a saved model directory")
    transcribe.add_argument("model", help="a SALM directory in the HF layout")
    transcribe.add_argument("audio", nargs="+", help="audio files (any rate; resampled)")
    transcribe.add_argument("--llm-path", default=None, help="LLM config+tokenizer dir if the model has no llm_backbone/")
    transcribe.add_argument("--max-new-tokens", type=int, default=128)
    transcribe.set_defaults(func=_transcribe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
