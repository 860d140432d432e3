"""Acquisition-shift figure of a 3D config: ``python -m experiments.plot_volumes --config=C``.

Writes ``--out F`` (PNG): per site (client), one training volume's axial, coronal and sagittal
mid-slices before and after
that site's simulated scanner (slice thickness, blur, noise, ...), exactly as training sees it.
Config fields can be overridden as in ``experiments.run`` (``--config.data.name=...``).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxfl.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a 3D config file.")
_OUT = flags.DEFINE_string("out", None, "Output PNG file.", required=True)
_TITLE = flags.DEFINE_string("title", None, "Figure title.")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("Give --config=configs/NAME.py (a config with 3D volumes).")
    from jaxfl.volume_figure import plot_volume_shifts

    try:
        out = plot_volume_shifts(_CONFIG.value, _OUT.value, title=_TITLE.value)
    except (UserError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(out)


if __name__ == "__main__":
    app.run(main)
