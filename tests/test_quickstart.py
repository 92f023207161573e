"""`salm quickstart --smoke`: every step of the main job runs and leaves its artefact."""

import json
from pathlib import Path

from salm.quickstart import QuickstartSize, run_quickstart


def test_quickstart_smoke_produces_every_artefact(tmp_path, ray_local, capsys) -> None:
    summary = run_quickstart(tmp_path / "qs", QuickstartSize.smoke())
    out = capsys.readouterr().out
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "config.resolved.yaml").exists()
    assert json.loads((Path(summary["checkpoint"]) / "train_state.json").read_text())["step"] in (
        6,
        12,
    )  # best by WER
    assert Path(summary["nemo"]).stat().st_size > 1_000_000
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in Path(summary["logs"]).read_text().splitlines()]
    assert rows[-1]["step"] == 12
    # the auxiliary encoder CTC loss runs inside the Ray Train + DeepSpeed workers and is logged apart
    assert all(row["ctc_loss"] > 0 for row in rows if "loss" in row)
    assert summary["untrained_wer"] >= 0 and summary["heldout_wer"] >= 0 and summary["rtfx"] > 0
    assert isinstance(summary["served_answer"], str)
    assert "POST http://127.0.0.1:" in out and "-> 200" in out
    predictions = (tmp_path / "qs" / "eval" / "trained" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == QuickstartSize.smoke().heldout_utterances
    assert json.loads((tmp_path / "qs" / "summary.json").read_text())["nemo"] == summary["nemo"]
