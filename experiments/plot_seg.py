"""Segmentation figure of a run: ``python -m experiments.plot_seg WORKDIR --out fig.png``.

Per hospital, the held-out slice with the most lesion, its ground truth (green) and the
predicted contour (red) of the model that hospital would use (global, adapted, or its own for
local-only), and below, every hospital's held-out Dice per round.
"""

import sys

from absl import app, flags

from jaxfl.errors import UserError

_OUT = flags.DEFINE_string("out", None, "Output PNG file.", required=True)
_TITLE = flags.DEFINE_string("title", None, "Figure title.")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("Give one segmentation run directory: WORKDIR.")
    from jaxfl.seg_figure import plot_segmentation

    try:
        out = plot_segmentation(argv[1], _OUT.value, title=_TITLE.value)
    except (UserError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(out)


if __name__ == "__main__":
    app.run(main)
