"""Learning curves of one or more runs: the task's primary test metric (accuracy, Dice) and the
loss per round, overlaid in one PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# A bare Figure renders with the Agg canvas: no pyplot, no global backend, no display needed.
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from jaxfl.metrics import read_metrics


def load_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The rounds logged in ``workdir/metrics.jsonl``; a clear error if there are none."""
    workdir = Path(workdir)
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        hint = (
            f" It holds a sweep summary: pass its runs instead, e.g. {workdir}/*/."
            if (workdir / "summary.csv").exists()
            else " Pass the --workdir of an experiments.run (or a sweep's run directory)."
        )
        raise FileNotFoundError(f"{workdir} has no metrics.jsonl.{hint}")
    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path} is empty: the run has not finished a round yet.")
    return rows


def primary_metric(rows: Sequence[dict[str, Any]]) -> str:
    """The task's primary metric these rounds log (``test_<metric>``): accuracy, dice, ..."""
    from jaxfl.factories import PRIMARY_METRICS

    for metric in dict.fromkeys(PRIMARY_METRICS.values()):
        if any(f"test_{metric}" in r or f"personalized_{metric}_mean" in r for r in rows):
            return metric
    return "accuracy"


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of ``key``, skipping rounds where it was not logged (or is NaN)."""
    points = [
        (r["round"], float(r[key]))
        for r in rows
        if isinstance(r.get(key), int | float) and not math.isnan(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(
    workdirs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot the primary test metric and test/train loss per round of ``workdirs`` into ``out``."""
    if not workdirs:
        raise ValueError("Give at least one run directory to plot.")
    labels = list(labels) if labels else [Path(w).resolve().name for w in workdirs]
    if len(labels) != len(workdirs):
        raise ValueError(
            f"--labels has {len(labels)} labels for {len(workdirs)} workdirs; give one "
            "comma-separated label per workdir, or leave --labels out to use directory names."
        )
    runs = [load_metrics(w) for w in workdirs]  # all errors before drawing anything

    metric = primary_metric(runs[0])
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for i, (rows, label) in enumerate(zip(runs, labels, strict=True)):
        color = f"C{i % 10}"
        acc_ax.plot(*series(rows, f"test_{metric}"), color=color, marker="o", ms=3, label=label)
        loss_ax.plot(*series(rows, "test_loss"), color=color, marker="o", ms=3)
        loss_ax.plot(*series(rows, "train_loss"), color=color, ls="--")
    acc_ax.set(title=f"Test {metric}", xlabel="round", ylabel=metric)
    loss_ax.set(title="Loss (solid: test, dashed: train)", xlabel="round", ylabel="loss")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    # Runs are told apart by colour in the accuracy legend; the loss legend explains the styles.
    acc_ax.legend(fontsize="small" if len(runs) <= 4 else "x-small")
    loss_ax.legend(
        handles=[
            Line2D([], [], color="k", marker="o", ms=3, label="test"),
            Line2D([], [], color="k", ls="--", label="train"),
        ],
        fontsize="small",
    )
    fig.suptitle(title or f"Federated training: {len(runs)} run{'s' * (len(runs) > 1)}")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
