"""Launch one experiment: ``python -m experiments.run --config=configs/debug.py --workdir=DIR``.

Any config field can be overridden on the command line, e.g. ``--config.num_clients=20``.
Re-running the same command resumes from the workdir's last checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxfl.checkpoint import ConfigMismatchError
from jaxfl.data import MissingDataError
from jaxfl.logs import setup_launcher_logging
from jaxfl.train import train_and_evaluate
from jaxfl.validate import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    setup_launcher_logging()
    try:
        metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, ConfigMismatchError, MissingDataError) as e:
        # User errors: a clear message, no traceback.
        sys.exit(f"error: {e}")
    logging.info("final: %s", {k: v for k, v in metrics.items() if not isinstance(v, list)})


if __name__ == "__main__":
    app.run(main)
