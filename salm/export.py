"""`salm export`: a trained model (Ray Train checkpoint, or anything ``load_pretrained`` reads) ->
a self-contained ``.nemo`` and/or an HF-layout directory, in bf16 or fp32.

The HF directory loads in NeMo's own ``SALM.from_pretrained``; the ``.nemo`` loads with
``SALM.from_pretrained`` here with no network and none of the original source directories.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from salm.errors import SALMConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_model(
    checkpoint: str | Path,
    nemo: str | Path | None = None,
    hf: str | Path | None = None,
    dtype: str = "fp32",
    merge_lora: bool = False,
    llm_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
) -> dict[str, Path]:
    """Write the requested formats; returns ``{"nemo": path, "hf": path}`` for those written."""
    from salm.io.loading import load_pretrained
    from salm.io.nemo_file import merge_lora_into_llm, save_nemo

    if nemo is None and hf is None:
        raise SALMConfigError("nothing to export: give --nemo OUT.nemo and/or --hf OUT_DIR")
    if dtype not in DTYPES:
        raise SALMConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = load_pretrained(checkpoint, llm_path=llm_path, tokenizer_path=tokenizer_path).eval()
    if merge_lora:
        merge_lora_into_llm(model)
    written: dict[str, Path] = {}
    if nemo is not None:
        written["nemo"] = save_nemo(model, nemo, dtype=DTYPES[dtype])
    if hf is not None:
        written["hf"] = model.save_pretrained(hf, dtype=DTYPES[dtype])
    return written


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="Ray Train checkpoint -> .nemo and/or HF-layout directory")
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="Ray Train checkpoint dir (or .nemo, HF dir, NeMo .ckpt)"
    )
    parser.add_argument("--nemo", default=None, help="output .nemo file")
    parser.add_argument(
        "--hf", default=None, help="output HF-layout directory (config.json + model.safetensors)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype in the files")
    parser.add_argument(
        "--merge-lora", action="store_true", help="fold LoRA into the LLM weights (no PEFT needed)"
    )
    parser.add_argument(
        "--llm-path", default=None, help="LLM config + tokenizer dir if the checkpoint has none"
    )
    parser.add_argument("--tokenizer-path", default=None)


def run(args: argparse.Namespace) -> dict[str, Path]:
    written = export_model(
        args.checkpoint,
        nemo=args.nemo,
        hf=args.hf,
        dtype=args.dtype,
        merge_lora=args.merge_lora,
        llm_path=args.llm_path,
        tokenizer_path=args.tokenizer_path,
    )
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return written
