"""Self-contained ``.nemo`` files: one tar that loads with no network and no source directories.

Layout (an uncompressed tar with ``./``-prefixed names, as NeMo writes its own ``.nemo``)::

    model_config.yaml           the SALM config (NeMo's field names)
    model_weights.safetensors   every weight, tied tensors stored once
    llm_backbone/               the LLM's config.json, generation_config.json and tokenizer files
    salm_nemo.json              format version, dtype, merged LoRA or not, sha256 of each member

The mel preprocessor needs nothing beyond its config (its filterbank is computed at build time).
``pretrained_llm``/``pretrained_asr`` keep their original values for the record; loading never
reads them. Weights are read from safetensors, or, for a NeMo-style ``model_weights.ckpt``, with
``torch.load(weights_only=True)``: an archive can never run code on the machine that loads it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import re
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel
from safetensors.torch import save_file
from tqdm import tqdm

from salm.errors import CheckpointError
from salm.io.hf_layout import LLM_BACKBONE_DIR, load_weights, unique_state_dict
from salm.model.llm import base_causal_lm
from salm.model.salm import SALM

MODEL_CONFIG = "model_config.yaml"
SAFETENSORS_WEIGHTS = "model_weights.safetensors"
TORCH_WEIGHTS = "model_weights.ckpt"  # what NeMo's own .nemo files hold
METADATA = "salm_nemo.json"
FORMAT_VERSION = 1
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


# ----- writing -----
def save_nemo(
    model: SALM, path: str | Path, dtype: torch.dtype | None = None, merge_lora: bool = False
) -> Path:
    """Write ``model`` as a self-contained ``.nemo`` tar.

    ``merge_lora=True`` folds the LoRA adapters into the LLM weights (a plain LLM, faster to
    serve, no PEFT at load time) and mutates ``model`` to match; ``False`` keeps the adapters as
    separate tensors under NeMo SALM's key names, so training can resume from the file.
    """
    path = Path(path)
    if merge_lora:
        merge_lora_into_llm(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".salm-nemo-") as staging:
        staging = Path(staging)
        config = OmegaConf.to_container(model.cfg, resolve=True)
        (staging / MODEL_CONFIG).write_text(OmegaConf.to_yaml(config))
        save_file(
            unique_state_dict(model, dtype), str(staging / SAFETENSORS_WEIGHTS), metadata={"format": "pt"}
        )
        backbone = staging / LLM_BACKBONE_DIR
        causal_lm = base_causal_lm(model.llm)
        causal_lm.config.save_pretrained(backbone)
        causal_lm.generation_config.save_pretrained(backbone)
        model.tokenizer.save_pretrained(backbone)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        metadata = {
            "format": "salm-nemo",
            "version": FORMAT_VERSION,
            "dtype": str(dtype or model.embed_tokens.weight.dtype).removeprefix("torch."),
            "merged_lora": merge_lora,
            "sha256": {p.relative_to(staging).as_posix(): _sha256(p) for p in files},
        }
        (staging / METADATA).write_text(json.dumps(metadata, indent=2))
        partial = path.with_name(path.name + ".partial")  # an interrupted save never leaves a bad .nemo
        # The checksums go first and the weights last, so a truncated copy always misses a listed member.
        ordered = [staging / METADATA, *sorted(files, key=lambda p: p.name == SAFETENSORS_WEIGHTS)]
        total = sum(file.stat().st_size for file in ordered)
        with (
            tarfile.open(partial, "w:") as tar,
            tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path.name}", leave=False) as bar,
        ):
            for file in ordered:
                info = tar.gettarinfo(file, arcname=f"./{file.relative_to(staging).as_posix()}")
                with file.open("rb") as handle:
                    tar.addfile(info, _ProgressReader(handle, bar))
        partial.replace(path)
    return path


def merge_lora_into_llm(model: SALM) -> SALM:
    """Fold LoRA into the LLM's weights in place and drop ``lora`` from the config.

    The key is deleted rather than set to null because NeMo installs LoRA when ``"lora" in cfg``.
    """
    if not isinstance(model.llm, PeftModel):
        return model
    model.llm = model.llm.merge_and_unload()
    with open_dict(model.cfg):
        model.cfg.pop("lora", None)
    return model


class _ProgressReader:
    """A binary file whose reads advance a progress bar (tarfile copies members through ``read``)."""

    def __init__(self, handle: IO[bytes], bar: tqdm) -> None:
        self.handle, self.bar = handle, bar

    def read(self, size: int = -1) -> bytes:
        chunk = self.handle.read(size)
        self.bar.update(len(chunk))
        return chunk


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ----- reading -----
def load_nemo(path: str | Path, tokenizer_path: str | Path | None = None) -> SALM:
    """Load a ``.nemo`` written by ``save_nemo`` (or one with a NeMo-style ``model_weights.ckpt``)."""
    path = Path(path)
    with extracted_archive(path) as root:
        if not (root / MODEL_CONFIG).exists():
            raise CheckpointError(f"{str(path)!r} is not a SALM .nemo: it has no {MODEL_CONFIG}")
        if not (root / LLM_BACKBONE_DIR / "config.json").exists():
            raise CheckpointError(
                f"{str(path)!r} has no {LLM_BACKBONE_DIR}/config.json (the LLM config and tokenizer); "
                "re-export it with `salm export`"
            )
        stored = OmegaConf.load(root / MODEL_CONFIG)
        if not isinstance(stored, DictConfig):
            raise CheckpointError(f"{MODEL_CONFIG} in {str(path)!r} is not a mapping")
        config = OmegaConf.merge(
            stored,
            {
                "pretrained_weights": False,  # every weight comes from the archive
                "pretrained_llm": str(root / LLM_BACKBONE_DIR),
                "tokenizer_path": str(tokenizer_path) if tokenizer_path else None,
            },
        )
        has_safetensors = (root / SAFETENSORS_WEIGHTS).exists()
        if not has_safetensors and not (root / TORCH_WEIGHTS).exists():
            raise CheckpointError(
                f"{str(path)!r} holds no weights ({SAFETENSORS_WEIGHTS} or {TORCH_WEIGHTS}); re-export it"
            )
        # Unpickle (restricted) before building anything: a refused file fails fast.
        state_dict = None if has_safetensors else load_torch_file(root / TORCH_WEIGHTS)
        model = SALM(config)
        if state_dict is None:
            load_weights(model, root / SAFETENSORS_WEIGHTS)
        else:
            load_state_dict_checked(model, state_dict, str(path))
    with open_dict(model.cfg):  # the extracted files are gone; keep the values the file recorded
        model.cfg.pretrained_llm = stored.get("pretrained_llm")
        model.cfg.tokenizer_path = stored.get("tokenizer_path")
    return model


@contextmanager
def extracted_archive(path: Path, members: set[str] | None = None) -> Iterator[Path]:
    """Extract ``path`` (or only ``members``) into a temporary directory, removed afterwards.

    Refuses links, devices and names that would escape the directory; checks the sha256 sums in
    ``salm_nemo.json`` when there is one. Truncated or corrupt archives become a ``CheckpointError``.
    """
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist or is not a file")
    with tempfile.TemporaryDirectory(prefix="salm-nemo-") as scratch:
        root = Path(scratch)
        try:
            with tarfile.open(path, "r:*") as tar:
                entries = [(_member_name(path, m), m) for m in tar.getmembers()]
                wanted = [(n, m) for n, m in entries if members is None or n in members | {METADATA}]
                total = sum(m.size for _, m in wanted)
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"reading {path.name}", leave=False
                ) as bar:
                    for name, member in wanted:
                        if member.isdir() or not name:
                            continue
                        target = root / name
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as source, target.open("wb") as sink:
                            _copy(source, sink, bar)
        except ARCHIVE_ERRORS as error:
            raise CheckpointError(
                f"{str(path)!r} is not a readable .nemo archive (truncated or corrupt?): {error}. "
                "Copy or export it again."
            ) from error
        _verify_checksums(path, root, members)
        yield root


def _member_name(archive: Path, member: tarfile.TarInfo) -> str:
    name = PurePosixPath(member.name)
    parts = [p for p in name.parts if p not in (".", "")]
    if name.is_absolute() or ".." in parts:
        raise CheckpointError(f"refusing {str(archive)!r}: member {member.name!r} points outside the archive")
    if not (member.isfile() or member.isdir()):
        raise CheckpointError(
            f"refusing {str(archive)!r}: member {member.name!r} is a link or device, which a model file never holds"
        )
    return "/".join(parts)


def _copy(source: IO[bytes], sink: IO[bytes], bar: tqdm) -> None:
    while chunk := source.read(1 << 22):
        sink.write(chunk)
        bar.update(len(chunk))


def _verify_checksums(archive: Path, root: Path, members: set[str] | None) -> None:
    if not (root / METADATA).exists():
        return  # NeMo-style archives carry no checksums
    try:
        expected = json.loads((root / METADATA).read_text())["sha256"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{METADATA} in {str(archive)!r} is corrupt: {error}") from error
    for name, digest in expected.items():
        if members is not None and name not in members:
            continue
        file = root / name
        if not file.exists():
            raise CheckpointError(
                f"{str(archive)!r} lacks {name}, which it lists: the file is truncated. Copy or export it again."
            )
        if _sha256(file) != digest:
            raise CheckpointError(
                f"{name} in {str(archive)!r} does not match its recorded sha256: the file is corrupt. "
                "Copy or export it again."
            )


# ----- weights through restricted unpickling only -----
def load_torch_file(file: str | Path) -> dict:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    file = Path(file)
    try:
        # mmap keeps multi-GB checkpoints out of RAM; only the zip format (torch >= 1.6) supports it.
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {str(file)!r}: it contains Python objects beyond tensors and plain "
            f"containers, and unpickling them could run arbitrary code ({_unpickling_reason(error)}). "
            "If you trust where it came from, re-save only its tensors in a trusted environment: "
            "torch.save({'state_dict': ckpt['state_dict'], 'hyper_parameters': {'cfg': <plain dict>}}, out)"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"{str(file)!r} is not a readable torch checkpoint (truncated or corrupt?): {_first_line(error)}"
        ) from error


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly, tolerating only missing aliases of tied tensors; name the first offending keys."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"the weights in {source!r} are not a mapping of names to tensors")
    expected = model.state_dict()
    missing = set(expected) - set(state_dict)
    present_storage = {expected[k].data_ptr() for k in expected if k in state_dict}
    missing = {k for k in missing if expected[k].data_ptr() not in present_storage}  # tied copies
    unexpected = set(state_dict) - set(expected)
    wrong_shape = sorted(
        k for k in set(state_dict) & set(expected) if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        details = [
            f"{len(missing)} missing (first: {sorted(missing)[:5]})",
            f"{len(unexpected)} unexpected (first: {sorted(unexpected)[:5]})",
        ]
        if wrong_shape:
            first = wrong_shape[0]
            details.append(
                f"{len(wrong_shape)} with a different shape (first: {first} "
                f"{tuple(state_dict[first].shape)} in the file vs {tuple(expected[first].shape)} in the model)"
            )
        raise CheckpointError(
            f"weights in {source!r} do not match the model's architecture: " + ", ".join(details)
        )
    model.load_state_dict(state_dict, strict=False)


def _unpickling_reason(error: Exception) -> str:
    """The one useful line of torch's weights-only error: which global it refused."""
    found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", str(error))
    return found.group(1) if found else _first_line(error)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
