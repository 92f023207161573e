"""The `salm` command line. Each subcommand lives in the module that owns its job and registers
itself through a ``register(commands)`` function; this file only dispatches and turns user
errors into one readable line (exit code 2) instead of a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from salm.errors import AudioLoadError, CheckpointError, PromptError, SALMConfigError

USER_ERRORS = (SALMConfigError, AudioLoadError, PromptError, CheckpointError, FileNotFoundError)

# Modules with a ``register(commands: argparse._SubParsersAction) -> None`` function.
COMMAND_MODULES = [
    "salm.quickstart",
    "salm.transcribe",
    "salm.generate",
    "salm.evaluate",
    "salm.export",
    "serve.cli",  # after salm.transcribe: it adds `--url` to that command
    "salm.train.cli",
    "salm.data.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salm", description="Train and serve SALM speech recognisers on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def run_command(func, args: argparse.Namespace) -> int:
    """Run ``func(args)``; user errors become one ``error:`` line and exit code 2 (also for ray_jobs/)."""
    try:
        func(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
