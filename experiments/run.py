"""Launch one experiment: ``python -m experiments.run --config=configs/debug.py --workdir=DIR``.

Any config field can be overridden on the command line, e.g. ``--config.num_clients=20``;
``--print_config`` prints the resolved config (every field) and exits. Re-running the same
command resumes from the workdir's last checkpoint. Mistakes in the config, the data or the
workdir are reported as one ``error:`` line (``--debug`` shows the traceback).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.cli import config_or_exit, describe_configs, parse_flags_or_exit, run_or_exit
from jaxfl.logs import setup_launcher_logging
from jaxfl.train import train_and_evaluate

__doc__ += describe_configs()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
_PRINT = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
flags.DEFINE_bool("debug", False, "Show the full traceback of errors.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_or_exit(_CONFIG)
    if _PRINT.value:
        print(config)
        return
    if _WORKDIR.value is None:
        sys.exit("error: --workdir is required (the directory for metrics and checkpoints)")
    setup_launcher_logging()
    metrics = run_or_exit(train_and_evaluate, config, _WORKDIR.value)
    logging.info("final: %s", {k: v for k, v in metrics.items() if not isinstance(v, list)})


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags_or_exit)
