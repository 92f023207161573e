"""`salm train --config-name NAME key=value ...` (also `python ray_jobs/train.py ...` for `ray job submit`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-name", default="tiny", help="bundled recipe name (salm/configs/) or a YAML path"
    )
    parser.add_argument("--config-path", default=None, help="directory to look up --config-name in")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=100")


def run(args: argparse.Namespace) -> None:
    from salm.train.driver import run_training
    from salm.train.recipe import load_recipe

    run_training(load_recipe(args.config_name, args.overrides, args.config_path))


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a SALM with Ray Train + DeepSpeed from a recipe")
    add_arguments(parser)
    parser.set_defaults(func=run)
