"""Launcher logging: jaxfl's INFO lines without the INFO chatter of orbax and jax."""

from __future__ import annotations

import logging as py_logging

from absl import logging

# Libraries whose INFO lines drown the round log (orbax logs every save in several lines).
_NOISY = ("/orbax/", "/jax/_src/")


class _DropLibraryInfo(py_logging.Filter):
    """Drop INFO lines from noisy libraries; keep everything else and all warnings."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in _NOISY)
        return record.levelno >= py_logging.WARNING or not noisy


def setup_launcher_logging() -> None:
    """Log progress at INFO through absl, without orbax's and jax's INFO chatter."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_DropLibraryInfo())
