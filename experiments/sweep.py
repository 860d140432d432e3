"""Run a grid of experiments and summarize them.

    python -m experiments.sweep --config=configs/debug.py --workdir=DIR \
        --sweep='num_clients=5,10,20' --sweep='algorithm=fedavg,fedprox' --config.rounds=3

Each ``--sweep=KEY=V1,V2`` adds a grid axis (KEY is a dotted config field; ``algorithm``,
``model`` or ``partition`` set their ``.name``). ``--config.x=y`` overrides apply to every run.
Each run goes to ``DIR/<key=value__...>``; re-running the command skips finished runs and
resumes partial ones. ``DIR/summary.csv`` and ``DIR/summary.md`` summarize the grid.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from experiments.cli import config_or_exit, describe_configs, parse_flags_or_exit, run_or_exit
from jaxfl.errors import UserError
from jaxfl.logs import setup_launcher_logging
from jaxfl.sweep import run_sweep, to_markdown

__doc__ += describe_configs()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "KEY=V1,V2,...: a config field and its values; repeat for a grid."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the summary.")
flags.DEFINE_bool("debug", False, "Show the full traceback of errors.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_or_exit(_CONFIG)
    setup_launcher_logging()
    rows = run_or_exit(_sweep, config)
    print(to_markdown(rows), end="")
    failed = [row["run"] for row in rows if row["status"] == "failed"]
    if failed:
        sys.exit(
            f"{len(failed)} of {len(rows)} runs failed: {', '.join(failed)}. See the error "
            f"column of {_WORKDIR.value}/summary.csv; re-run the command to retry them."
        )


def _sweep(config):
    """The sweep; a bad ``--sweep`` value is a user error (errors inside runs are in the
    summary)."""
    try:
        return run_sweep(config, _SWEEP.value, _WORKDIR.value)
    except UserError:
        raise
    except ValueError as e:
        raise UserError(str(e)) from e


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags_or_exit)
