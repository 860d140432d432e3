"""Launcher logging: jaxfl's INFO lines, only warnings from libraries (orbax logs every save)."""

from __future__ import annotations

import logging as py_logging

from absl import logging


class _DropLibraryInfo(py_logging.Filter):
    """Keep INFO lines from jaxfl only."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/jaxfl/" in record.pathname


def setup_launcher_logging() -> None:
    """Log jaxfl progress at INFO through absl; drop other libraries' INFO chatter."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_DropLibraryInfo())
