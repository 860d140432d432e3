"""Learning-curve plots: a valid PNG from fake runs, via the function and the CLI, clear errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from jaxfl.plotting import load_metrics, plot_runs, series

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(workdir: Path, rounds: int = 6, eval_every: int = 2, offset: float = 0.0) -> Path:
    """A metrics.jsonl like train_and_evaluate's, with test metrics every ``eval_every`` rounds."""
    workdir.mkdir(parents=True)
    lines = []
    for r in range(1, rounds + 1):
        m = {"round": r, "train_loss": 2.0 / r + offset, "wall_time_s": 0.5 * r}
        if r % eval_every == 0 or r == rounds:
            m.update(test_accuracy=0.3 + 0.1 * r - offset, test_loss=2.2 / r + offset, test_auc=0.8)
        lines.append(json.dumps(m))
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return workdir


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the magic bytes."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def runs(tmp_path):
    return [_fake_run(tmp_path / "fedavg"), _fake_run(tmp_path / "fedprox", offset=0.05)]


def test_series_skips_rounds_without_the_metric(runs):
    rows = load_metrics(runs[0])
    assert series(rows, "test_accuracy")[0] == [2, 4, 6]
    assert series(rows, "train_loss")[0] == [1, 2, 3, 4, 5, 6]
    assert series([{"round": 1, "test_loss": float("nan")}], "test_loss") == ([], [])


def test_plot_runs_writes_a_png(runs, tmp_path):
    out = plot_runs(runs, tmp_path / "figs" / "curves.png", labels=["a", "b"], title="t")
    assert out.stat().st_size > 10_000
    width, height = _png_size(out)
    assert 800 <= width <= 3000 and 300 <= height <= 2000


def test_cli_writes_a_png(runs, tmp_path):
    out = tmp_path / "cli.png"
    cmd = [sys.executable, "-m", "experiments.plot", *map(str, runs), f"--out={out}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    assert _png_size(out)[0] > 0 and out.stat().st_size > 10_000


def test_missing_metrics_is_a_clear_error(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        plot_runs([runs[0], tmp_path / "empty"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    cmd = [
        sys.executable,
        "-m",
        "experiments.plot",
        str(tmp_path / "empty"),
        f"--out={tmp_path}/x.png",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "has no metrics.jsonl" in result.stderr


def test_label_count_must_match(runs, tmp_path):
    with pytest.raises(ValueError, match="--labels has 1 labels for 2 workdirs"):
        plot_runs(runs, tmp_path / "x.png", labels=["only"])
