"""Privacy audit of a config: ``python -m experiments.attack --config=configs/attack_idlg.py
--workdir=DIR``.

Attacks every protection in ``config.attack.protections`` (gradient inversion of what the server
sees, membership inference, the empirical epsilon next to the accountant's) and writes
``results.json``, ``results.md`` (the table) and ``reconstructions.png`` to the workdir.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.cli import config_or_exit, describe_configs, parse_flags_or_exit, run_or_exit
from jaxfl.attacks.report import run_suite
from jaxfl.logs import setup_launcher_logging
from jaxfl.train import load_federated_data
from jaxfl.validate import validate_config

__doc__ += describe_configs()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the table and the figure.")
flags.DEFINE_bool("debug", False, "Show the full traceback of errors.")


def audit(config, workdir: str) -> list[dict]:
    """Load the config's data and run the attack suite into ``workdir``."""
    validate_config(config)
    return run_suite(config, load_federated_data(config), Path(workdir))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_or_exit(_CONFIG)
    if _WORKDIR.value is None:
        sys.exit("error: --workdir is required (the directory for the table and the figure)")
    setup_launcher_logging()
    run_or_exit(audit, config, _WORKDIR.value)
    logging.info("wrote %s", Path(_WORKDIR.value) / "results.md")
    print((Path(_WORKDIR.value) / "results.md").read_text())


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags_or_exit)
