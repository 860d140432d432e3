"""What the launchers share: one-line errors, the shipped configs in ``--help``."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import NoReturn

from absl import flags

from jaxfl.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def describe_configs() -> str:
    """``--help`` text: each shipped config with the first line of its docstring."""
    lines = ["", "Shipped configs (--config=configs/NAME.py; --print_config shows every field):"]
    for path in sorted(CONFIGS.glob("*.py")):
        if path.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines.append(f"  {path.stem:30s} {doc.splitlines()[0] if doc else ''}")
    return "\n".join(lines) + "\n"


def _debug() -> bool:
    return "--debug" in sys.argv[1:] or "--debug=true" in (a.lower() for a in sys.argv[1:])


def _exit_with(e: BaseException) -> NoReturn:
    """Print a flag or config-loading error as one ``error:`` line and exit with status 2."""
    if _debug():
        raise e
    if isinstance(e, OSError):
        reason = str(e).strip().splitlines()[-1].strip()
        message = f"cannot load --config={config_source() or '?'}: {reason}"
    else:
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        message = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
        typo = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', message)
        if typo:
            message = (
                f"a --config override names an unknown field {typo.group(2)!r}; did you mean "
                f"{typo.group(1)!r}? (--print_config lists every field)"
            )
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


_LOAD_ERRORS = (flags.Error, KeyError, AttributeError, OSError, SyntaxError, ValueError, TypeError)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag (a misspelled override, say) as one ``error:``
    line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except _LOAD_ERRORS as e:
        _exit_with(e)


def config_or_exit(holder):
    """The ``--config`` flag's value, loaded; a file that cannot be loaded is one ``error:``
    line (ml_collections defers the error to the first use of the config, so use it here)."""
    try:
        config = holder.value
        config.keys()
        return config
    except _LOAD_ERRORS as e:
        _exit_with(e)


def config_source() -> str:
    """The ``--config`` file, for error messages (empty if unknown)."""
    try:
        from ml_collections import config_flags

        return config_flags.get_config_filename(flags.FLAGS["config"]) or ""
    except (KeyError, AttributeError):
        return ""


def run_or_exit(fn, *args):
    """``fn(*args)``; a :class:`UserError` becomes ``error: ...`` on stderr and exit status 2."""
    try:
        return fn(*args)
    except UserError as e:
        if _debug():
            raise
        source = config_source()
        where = f" (--config={source})" if source and "config." in str(e) else ""
        sys.stderr.write(f"error{where}: {e}\n")
        sys.exit(2)
