"""Plot learning curves of runs: ``python -m experiments.plot WORKDIR [...] --out fig.png``.

Two panels: test accuracy per round, and test loss (solid) with train loss (dashed) per round.
``--labels=a,b`` names the runs (default: the workdir names). For a sweep, pass ``DIR/*/``.
"""

import sys

from absl import app, flags

from jaxfl.plotting import plot_runs

_OUT = flags.DEFINE_string("out", None, "Output PNG file.", required=True)
_LABELS = flags.DEFINE_list("labels", None, "Comma-separated legend labels, one per workdir.")
_TITLE = flags.DEFINE_string("title", None, "Figure title (default: the number of runs).")


def main(argv: list[str]) -> None:
    workdirs = argv[1:]
    if not workdirs:
        raise app.UsageError("Give one or more run directories: WORKDIR [WORKDIR ...].")
    try:
        out = plot_runs(workdirs, _OUT.value, labels=_LABELS.value, title=_TITLE.value)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(out)


if __name__ == "__main__":
    app.run(main)
