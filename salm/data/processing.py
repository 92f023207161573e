"""The CPU stages of the Ray Data pipeline: decode audio, then prompt + tokenize, then filter.

Each stage is a plain function over a batch (``dict`` of numpy columns) so that Ray Data fuses it
with the read tasks: a worker reads a shard, decodes and tokenizes it without shipping encoded
audio between processes. The tokenizer is loaded once per worker process (``lru_cache``).

A row that cannot be used is dropped and counted: ``skipped`` for broken data (undecodable
audio, a transcript that tokenizes to nothing), ``filtered`` for rows outside the configured
duration/token limits. The counts ride on the next row of the batch, or on a row with an empty
``id`` when nothing follows (``iterate_batches`` consumes those).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator

import numpy as np
import soundfile

from salm.data.config import DataConfig
from salm.data.lengths import example_length
from salm.data.shar_source import SkipLog
from salm.errors import SALMConfigError

_SEEN_BAD_CUTS: set[str] = set()  # per worker process: each bad cut is logged once


# --- audio -----------------------------------------------------------------------------------


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """Encoded audio bytes -> mono float32 at ``sample_rate``, shape ``(num_samples,)``."""
    try:
        samples, source_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        samples = samples.T  # (channels, samples)
    except soundfile.LibsndfileError:
        from lhotse.audio import read_audio  # formats libsndfile lacks (e.g. some opus/mp3 builds)

        samples, source_rate = read_audio(io.BytesIO(data))
    mono = samples.mean(axis=0, dtype=np.float32)
    if source_rate != sample_rate:
        mono = resample(mono, source_rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """float32 ``samples`` at ``source_rate`` -> at ``target_rate``: scipy's polyphase ``resample_poly``,
    what Lhotse's ``Resample`` runs without torchaudio (not among our dependencies), with the same
    low-pass filter.

    Why not call Lhotse's: scipy designs that filter anew on every call, a Kaiser-windowed FIR of
    ``20 * max(up, down) + 1`` taps (8,821 for 44.1 -> 16 kHz), which took 16-33% of each 5 s
    clip's resampling time. A read task resamples every row of a corpus at one or two rates, so the
    filter is designed once per rate pair here (``resampling_filter``). Same numbers as scipy's own
    design (``tests/test_data_pipeline.py``).
    """
    from scipy.signal import resample_poly

    common = np.gcd(source_rate, target_rate)
    up, down = target_rate // common, source_rate // common
    return resample_poly(samples, up, down, window=resampling_filter(up, down)).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=16)
def resampling_filter(up: int, down: int) -> np.ndarray:
    """The FIR filter ``scipy.signal.resample_poly`` designs for ``up``/``down`` with its default
    window (Kaiser, beta 5), in float32 as it casts it for float32 samples. ``resample_poly`` copies
    the array it is given, so the cached one is never modified."""
    from scipy.signal import firwin

    max_rate = max(up, down)
    taps = firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    return taps.astype(np.float32)


def decode_batch(batch: dict[str, np.ndarray], cfg: DataConfig) -> dict[str, np.ndarray]:
    """Ray Data stage: ``audio_bytes`` -> ``audio`` (mono, ``cfg.sample_rate``), exact ``duration``."""

    def decode(row: dict, skips: SkipLog) -> dict | None:
        try:
            audio = decode_audio(row["audio_bytes"], cfg.sample_rate)
        except Exception as error:  # libsndfile and friends raise many types on corrupt input
            skips.skip(row["id"], f"audio cannot be decoded: {error}")
            return None
        if audio.size == 0:
            skips.skip(row["id"], "audio holds no samples")
            return None
        duration = audio.size / cfg.sample_rate
        if (cfg.min_duration is not None and duration < cfg.min_duration) or (
            cfg.max_duration is not None and duration > cfg.max_duration
        ):
            skips.filter()
            return None
        return {
            "id": row["id"],
            "audio": audio,
            "duration": duration,
            "text": row["text"],
            "context": row["context"],
        }

    empty = {"id": "", "audio": np.zeros(0, np.float32), "duration": 0.0, "text": "", "context": ""}
    return _apply(batch, decode, empty)


# --- prompt + tokens -------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def prompt_encoder(tokenizer_dir: str, prompt_format: str, audio_locator_tag: str):
    """(tokenizer, prompt format) for this worker process; loaded once, reused for every row."""
    from salm.text.prompt_formats import get_prompt_format
    from salm.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, audio_locator_tag)
    return tokenizer, get_prompt_format(prompt_format, tokenizer)


def user_message(cfg: DataConfig, context: str, audio_locator_tag: str) -> str:
    """The user turn: a per-cut ``context`` or ``asr_context_prompt`` before the tag, else ``prompt``.

    NeMo turns a cut with ``context`` into a user text turn followed by a user audio turn and joins
    consecutive user turns with a space; this builds the same string.
    """
    if context:
        return f"{context} {audio_locator_tag}"
    if cfg.asr_context_prompt is not None:
        return f"{cfg.asr_context_prompt} {audio_locator_tag}"
    return cfg.prompt


def encode_example(
    text: str, context: str, cfg: DataConfig, tokenizer_dir: str, prompt_format: str, audio_locator_tag: str
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int64, loss_mask bool) of the dialog user: prompt+audio, assistant: ``text``."""
    _, fmt = prompt_encoder(tokenizer_dir, prompt_format, audio_locator_tag)
    encoded = fmt.encode_dialog(
        [
            {"role": "user", "content": user_message(cfg, context, audio_locator_tag)},
            {"role": "assistant", "content": text},
        ]
    )
    return encoded.input_ids.numpy().astype(np.int64), encoded.loss_mask.numpy().astype(np.bool_)


def check_prompt(cfg: DataConfig, tokenizer_dir: str, prompt_format: str, audio_locator_tag: str) -> None:
    """Fail on the driver, before any worker starts, if the prompt lacks exactly one audio tag."""
    tokenizer, _ = prompt_encoder(tokenizer_dir, prompt_format, audio_locator_tag)
    tag_id = tokenizer.convert_tokens_to_ids(audio_locator_tag)
    input_ids, _ = encode_example("hello", "", cfg, tokenizer_dir, prompt_format, audio_locator_tag)
    count = int((input_ids == tag_id).sum())
    if count != 1:
        field = "asr_context_prompt" if cfg.asr_context_prompt is not None else "prompt"
        raise SALMConfigError(
            f"`data.{field}` must produce exactly one audio locator tag {audio_locator_tag!r} "
            f"(`model.audio_locator_tag`), got {count} in {user_message(cfg, '', audio_locator_tag)!r}"
        )


def tokenize_batch(
    batch: dict[str, np.ndarray],
    cfg: DataConfig,
    tokenizer_dir: str,
    prompt_format: str,
    audio_locator_tag: str,
) -> dict[str, np.ndarray]:
    """Ray Data stage: add ``input_ids``/``loss_mask``; apply ``min_tokens``/``max_tokens``."""
    tokenizer, _ = prompt_encoder(tokenizer_dir, prompt_format, audio_locator_tag)
    tag_id = tokenizer.convert_tokens_to_ids(audio_locator_tag)

    def tokenize(row: dict, skips: SkipLog) -> dict | None:
        if not tokenizer.encode(row["text"], add_special_tokens=False):
            skips.skip(row["id"], "transcript is empty or tokenizes to nothing")
            return None
        input_ids, loss_mask = encode_example(
            row["text"], row["context"], cfg, tokenizer_dir, prompt_format, audio_locator_tag
        )
        if int((input_ids == tag_id).sum()) != 1:
            skips.skip(row["id"], "its `context` must not contain the audio locator tag")
            return None
        if cfg.min_tokens is not None or cfg.max_tokens is not None:
            length = example_length(
                len(input_ids),
                int(loss_mask.sum()),
                row["duration"],
                cfg.token_equivalent_duration,
                cfg.measure_total_length,
            )
            if (cfg.min_tokens is not None and length < cfg.min_tokens) or (
                cfg.max_tokens is not None and length > cfg.max_tokens
            ):
                skips.filter()
                return None
        return {
            "id": row["id"],
            "audio": row["audio"],
            "duration": row["duration"],
            "text": row["text"],
            "input_ids": input_ids,
            "loss_mask": loss_mask,
        }

    empty = {
        "id": "",
        "audio": np.zeros(0, np.float32),
        "duration": 0.0,
        "text": "",
        "input_ids": np.zeros(0, np.int64),
        "loss_mask": np.zeros(0, np.bool_),
    }
    return _apply(batch, tokenize, empty)


# --- plumbing shared by the stages ----------------------------------------------------------


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict]:
    keys = list(batch)
    for values in zip(*(batch[key] for key in keys), strict=True):
        yield dict(zip(keys, values, strict=True))


def _apply(
    batch: dict[str, np.ndarray], fn: Callable[[dict, SkipLog], dict | None], empty: dict
) -> dict[str, np.ndarray]:
    """Run ``fn`` per row; dropped rows' counts move to the next kept row (or a trailing tombstone)."""
    skips = SkipLog(_logged=_SEEN_BAD_CUTS)
    out: list[dict] = []
    for row in _rows(batch):
        skips.pending_skipped += int(row.pop("skipped"))
        skips.pending_filtered += int(row.pop("filtered"))
        if row["id"] == "":
            continue  # a tombstone: its counts are now pending
        new = fn(row, skips)
        if new is None:
            continue
        new["skipped"], new["filtered"] = skips.take()
        out.append(new)
    skipped, filtered = skips.take()
    if skipped or filtered or not out:
        out.append({**empty, "skipped": skipped, "filtered": filtered})
    return _columns(out)


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    columns = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], np.ndarray):
            column = np.empty(len(values), dtype=object)  # ragged: one array per row
            for index, value in enumerate(values):
                column[index] = value
        elif isinstance(values[0], str):
            column = np.array(values, dtype=object)
        else:
            column = np.asarray(values)
        columns[key] = column
    return columns
