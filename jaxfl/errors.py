"""The one base class of the mistakes a user can fix: the launchers print them as one line.

A :class:`UserError` message names the config field (or file, or flag) at fault and the fix;
``experiments/run.py`` and ``experiments/sweep.py`` print it as ``error: ...`` and exit with
status 2 (the full traceback only with ``--debug``). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: config, data file, workdir or privacy budget."""


class ConfigError(UserError, ValueError):
    """One or more config fields are invalid; the message lists each with a fix."""

    @classmethod
    def of(cls, errors: list[str], heading: str = "invalid config") -> ConfigError:
        """One line for one problem, else a heading and one line per problem."""
        if len(errors) == 1:
            return cls(f"{heading}: {errors[0]}")
        return cls(f"{heading} ({len(errors)} problems):\n  - " + "\n  - ".join(errors))


class DataFileError(UserError, ValueError):
    """A data file exists but cannot be used (truncated, wrong keys, shapes or dtypes)."""


class WorkdirError(UserError, OSError):
    """The workdir cannot be used (empty, a file, or not writable)."""
