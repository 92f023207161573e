"""The data pipeline on a real local Ray cluster: prepare -> Shar -> Ray Data rows -> train workers."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from salm.assets.synthetic_speech import make_sentences, synthesize_corpus
from salm.assets.tiny_llm import qwen3_tokenizer_dir
from salm.audio import load_audio
from salm.data.bucketing import iterate_batches
from salm.data.config import DataConfig
from salm.data.pipeline import build_dataset
from salm.data.prepare import prepare_shar

TAG = "<|audioplaceholder|>"
PAD = 151643


def test_the_data_pipeline_imports_neither_the_model_nor_its_libraries() -> None:
    """Every Ray Data process (read, decode, tokenize tasks; the split coordinator) imports the
    pipeline's modules before its first shard: the model's (NeMo, transformers, PEFT) tripled that
    (``bench/startup_cost.py``)."""
    from own_process import run_python

    heavy = ("salm.model.salm", "nemo", "transformers", "peft", "deepspeed")
    done = run_python(
        "-c",
        "import sys, salm.data.pipeline, salm.data.bucketing, salm.data.collate; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} or m in {heavy!r}))",
    )
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("source_rate", [8000, 22050, 44100, 48000])
def test_resampling_gives_scipys_numbers_with_the_filter_designed_once(source_rate: int) -> None:
    from scipy.signal import resample_poly

    from salm.data.processing import resample, resampling_filter

    clip = np.random.default_rng(source_rate).standard_normal(source_rate * 2).astype(np.float32)
    common = np.gcd(source_rate, 16000)
    expected = resample_poly(clip, 16000 // common, source_rate // common)  # designs its own filter
    resampling_filter.cache_clear()
    for _ in range(3):
        got = resample(clip, source_rate, 16000)
        assert got.dtype == np.float32 and got.shape == (32000,)
        np.testing.assert_array_equal(got, expected)
    assert resampling_filter.cache_info().misses == 1  # the cached filter was not modified in place


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """48 real utterances (one voice at 8 kHz) in two NeMo manifests, the first with 4 bad entries."""
    root = tmp_path_factory.mktemp("data_corpus")
    utterances = synthesize_corpus(
        root / "speech", make_sentences(48, seed=11), ["kal16", "slt", "kal", "rms"], workers=2
    )
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")

    def entry(u) -> dict:
        return {"audio_filepath": str(u.path), "duration": soundfile.info(u.path).duration, "text": u.text}

    first, second = utterances[:32], utterances[32:]
    bad = [
        {"audio_filepath": "missing.wav", "duration": 1.0, "text": "gone"},
        {**entry(first[0]), "text": "  "},
        {**entry(first[1]), "duration": entry(first[1])["duration"] + 5.0},
        {"audio_filepath": "broken.wav", "duration": 1.0, "text": "broken"},
    ]
    for name, entries in (
        ("a.json", [entry(u) for u in first] + bad),
        ("b.json", [entry(u) for u in second]),
    ):
        (root / name).write_text("".join(json.dumps(e) + "\n" for e in entries))
    return {"root": root, "first": first, "second": second}


@pytest.fixture(scope="session")
def shar(corpus: dict, ray_local) -> dict:
    root = corpus["root"]
    summary_a = prepare_shar([str(root / "a.json")], str(root / "shar_a"), shard_size=8, progress=False)
    prepare_shar([str(root / "b.json")], str(root / "shar_b"), shard_size=8, progress=False)
    return {"a": root / "shar_a", "b": root / "shar_b", "summary_a": summary_a}


def rows_of(cfg: DataConfig, **kwargs) -> list[dict]:
    dataset = build_dataset(cfg, str(qwen3_tokenizer_dir()), "qwen", TAG, **kwargs)
    return [row for row in dataset.iter_rows() if row["id"]]


def test_prepare_writes_shards_and_reports_what_it_skipped(shar: dict) -> None:
    summary = shar["summary_a"]
    assert summary.utterances == 32 and summary.shards == 4
    assert summary.skipped == {
        "missing audio file": 1,
        "empty text": 1,
        "duration mismatch": 1,
        "unreadable audio": 1,
    }
    assert len(list(shar["a"].glob("recording.*.tar"))) == 4
    assert sorted(p.name.split(".")[0] for p in shar["a"].iterdir()) == ["cuts"] * 4 + ["recording"] * 4


def test_round_trip_keeps_ids_durations_texts_and_samples(corpus: dict, shar: dict) -> None:
    rows = rows_of(DataConfig(shar_path=str(shar["a"]), batch_size=4), infinite=False)
    by_text = {row["text"]: row for row in rows}
    assert len(rows) == len(by_text) == 32
    from salm.text.tokenizer import load_tokenizer

    tag_id = load_tokenizer(qwen3_tokenizer_dir(), TAG).convert_tokens_to_ids(TAG)
    for utterance in corpus["first"]:
        row = by_text[utterance.text]
        expected = load_audio(utterance.path, 16000)
        assert row["id"].startswith(utterance.path.stem)
        assert row["audio"].dtype == np.float32 and row["audio"].shape == expected.shape
        np.testing.assert_allclose(row["audio"], expected, atol=2e-4)
        assert row["duration"] == pytest.approx(soundfile.info(utterance.path).duration, abs=2e-3)
        assert int((row["input_ids"] == tag_id).sum()) == 1
        assert row["input_ids"].dtype == np.int64 and row["loss_mask"].dtype == np.bool_
        assert row["loss_mask"][-1] and not row["loss_mask"][0]


def test_weighted_mixing_follows_the_weights(shar: dict) -> None:
    cfg = DataConfig(shar_path=[[str(shar["a"]), 3.0], [str(shar["b"]), 1.0]], batch_size=4, num_workers=1)
    dataset = build_dataset(cfg, str(qwen3_tokenizer_dir()), "qwen", TAG, infinite=True)
    b_ids = {row["id"] for row in rows_of(DataConfig(shar_path=str(shar["b"]), batch_size=4), infinite=False)}
    picked = []
    for row in dataset.iter_rows():
        if row["id"]:
            picked.append(row["id"] in b_ids)
        if len(picked) == 600:
            break
    assert np.mean(picked) == pytest.approx(0.25, abs=0.06)


def test_broken_cuts_are_skipped_and_counted(shar: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken_shar"
    broken.mkdir()
    for name in ("cuts.000000.jsonl.gz", "cuts.000001.jsonl.gz"):
        shutil.copy(shar["a"] / name, broken / name)
    with gzip.open(broken / "cuts.000000.jsonl.gz", "rt") as lines:
        cuts = [json.loads(line) for line in lines]
    cuts[1]["supervisions"] = []  # no transcript
    cuts[2]["supervisions"][0]["text"] = ""  # tokenizes to nothing
    with gzip.open(broken / "cuts.000000.jsonl.gz", "wt") as out:
        out.writelines(json.dumps(cut) + "\n" for cut in cuts)
    with (
        tarfile.open(shar["a"] / "recording.000000.tar") as src,
        tarfile.open(broken / "recording.000000.tar", "w") as dst,
    ):
        for member in src.getmembers():
            payload = src.extractfile(member).read()
            if member.name.startswith(cuts[0]["id"]) and member.name.endswith(".flac"):
                payload = b"fLaC" + bytes(len(payload))  # a corrupt FLAC
                member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    whole = (shar["a"] / "recording.000001.tar").read_bytes()
    (broken / "recording.000001.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-member

    cfg = DataConfig(shar_path=str(broken), batch_size=64)
    dataset = build_dataset(cfg, str(qwen3_tokenizer_dir()), "qwen", TAG, infinite=False)
    batches = list(iterate_batches(dataset.iter_rows(), cfg, PAD))
    kept = [i for batch in batches for i in batch["ids"]]
    assert not {cuts[0]["id"], cuts[1]["id"], cuts[2]["id"]} & set(kept)
    assert 5 <= len(kept) < 16
    assert batches[-1]["metrics"]["skipped_total"] == 16 - len(kept)


def _worker_loop(config: dict) -> None:
    """Each rank: bucket its split of the finite and the infinite dataset; write what it saw."""
    import ray.train

    from salm.data.sync import stop_together

    rank = ray.train.get_context().get_world_rank()
    cfg = DataConfig.from_dict(config["data"])
    finite = list(stop_together(iterate_batches(ray.train.get_dataset_shard("finite").iter_rows(), cfg, PAD)))
    infinite = iterate_batches(ray.train.get_dataset_shard("infinite").iter_rows(), cfg, PAD)
    steps = [next(infinite)["ids"] for _ in range(config["max_steps"])]
    seen = {"finite": [b["ids"] for b in finite], "infinite": steps}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


def test_two_train_workers_get_disjoint_data_and_the_same_number_of_batches(
    shar: dict, tmp_path: Path
) -> None:
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

    data = {
        "shar_path": str(shar["b"]),
        "batch_duration": 8.0,
        "use_bucketing": True,
        "num_buckets": 3,
        "max_duration": 6.0,
        "num_workers": 1,
    }
    text = (str(qwen3_tokenizer_dir()), "qwen", TAG)
    cfg = DataConfig.from_dict(data)
    datasets = {
        "finite": build_dataset(cfg, *text, infinite=False),
        "infinite": build_dataset(cfg, *text, infinite=True),
    }
    TorchTrainer(
        _worker_loop,
        train_loop_config={"data": data, "max_steps": 4, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets=datasets,
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="data_ranks"),
    ).fit()
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    finite_ids = [{i for batch in s["finite"] for i in batch} for s in seen]
    assert len(seen[0]["finite"]) == len(seen[1]["finite"]) > 0
    assert not finite_ids[0] & finite_ids[1]
    assert len(finite_ids[0] | finite_ids[1]) >= 10  # of 16: stop_together drops at most a tail
    assert len(seen[0]["infinite"]) == len(seen[1]["infinite"]) == 4
