"""The `salm` command line: real subprocesses, readable errors instead of tracebacks."""

import subprocess
import sys


def _salm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "salm.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_transcribe_prints_one_line_per_file(tiny_salm, speech_clips, tmp_path) -> None:
    model_dir = tiny_salm.save_pretrained(tmp_path / "model")
    paths = [str(u.path) for u in speech_clips[:2]]
    result = _salm("transcribe", str(model_dir), *paths, "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == paths


def test_missing_model_dir_is_one_error_line_not_a_traceback(tmp_path) -> None:
    result = _salm("transcribe", str(tmp_path / "nothing"), "a.wav")
    assert result.returncode == 2
    assert "error:" in result.stderr and "config.json is missing" in result.stderr
    assert "Traceback" not in result.stderr
