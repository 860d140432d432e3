"""Grid sweeps over config fields: one resumable run per grid point, then a summary table.

``run_sweep(config, ["num_clients=5,10", "algorithm=fedavg,fedprox"], workdir)`` trains every
combination into ``workdir/<run name>/`` and writes ``summary.csv`` and ``summary.md``. The
summary is rebuilt from each run's ``metrics.jsonl`` (plus a small ``sweep_run.json`` recording
the swept values and whether the last attempt failed), so it is right for skipped runs too.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxfl.checkpoint import check_same_config
from jaxfl.errors import UserError
from jaxfl.factories import PRIMARY_METRICS
from jaxfl.metrics import read_metrics
from jaxfl.train import train_and_evaluate
from jaxfl.validate import validate_config

RECORD_FILE = "sweep_run.json"
# Columns after the run name and the swept values, in this order; {m} is the task's primary
# metric (accuracy for classification, dice for segmentation: jaxfl.factories.PRIMARY_METRICS).
_SUMMARY_TEMPLATE = (
    "status",
    "rounds_done",
    "final_test_{m}",
    "best_test_{m}",
    "best_round",
    "final_test_auc",
    "final_heldout_{m}_mean",
    "final_heldout_{m}_std",
    "final_personalized_{m}_mean",
    "final_personalized_{m}_std",
    "wall_time_s",
    "error",
)
# Shown only when some run has them (personalized evaluation is opt-in; AUC is classification's).
_OPTIONAL_TEMPLATE = ("final_test_auc", "final_personalized_{m}_mean", "final_personalized_{m}_std")


def summary_fields(metric: str = "accuracy") -> tuple[str, ...]:
    """The summary columns for a task whose primary metric is ``metric``."""
    return tuple(f.format(m=metric) for f in _SUMMARY_TEMPLATE)


def optional_fields(metric: str = "accuracy") -> tuple[str, ...]:
    """The summary columns a table leaves out when no run has them."""
    return tuple(f.format(m=metric) for f in _OPTIONAL_TEMPLATE)


SUMMARY_FIELDS = summary_fields()
OPTIONAL_FIELDS = optional_fields()
_MAX_NAME = 120  # well under the usual 255-byte file-name limit, leaving room for a hash
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")

Overrides = dict[str, Any]
TrainFn = Callable[[ml_collections.ConfigDict, Path], Any]


def resolve_key(config: ml_collections.ConfigDict, key: str) -> str:
    """The dotted field path ``key`` names; a group with a ``name`` field stands for its name."""
    node: Any = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        parent = ".".join(["config", *parts[:i]])
        if not isinstance(node, ml_collections.ConfigDict):
            raise ValueError(f"Sweep key {key!r}: {parent} is a value, not a group of fields.")
        if part not in node:
            where = "top-level fields" if i == 0 else f"fields of {parent}"
            raise ValueError(
                f"Sweep key {key!r}: {parent} has no field {part!r}. "
                f"Valid {where}: {', '.join(sorted(node.keys()))}."
            )
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        if "name" in node:  # "algorithm=fedprox" reads better than "algorithm.name=fedprox"
            return f"{key}.name"
        raise ValueError(
            f"Sweep key {key!r} is a group of fields without a 'name'; sweep one of its fields "
            f"instead: {', '.join(f'{key}.{k}' for k in sorted(node.keys()))}."
        )
    return key


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    """The value at the dotted ``path`` of ``config``."""
    node: Any = config
    for part in path.split("."):
        node = node[part]
    return node


def parse_value(text: str, current: Any) -> Any:
    """``text`` parsed to the type of the field's ``current`` value (bool/int/float/str/tuple)."""
    text = text.strip()
    # bool before int: bool is a subclass of int.
    if isinstance(current, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{text!r} is not a bool; use true or false.")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an int.") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a float.") from None
    if isinstance(current, str):
        # 'a' and "a" (as a Python literal, or a shell that kept the quotes) mean a.
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return ast.literal_eval(text) if quoted else text
    if isinstance(current, tuple | list):
        inner = text[1:-1] if text[:1] in "([" and text[-1:] in ")]" else text
        items = [t for t in _split_values(inner) if t.strip()]
        like = current[0] if current else None
        return tuple(parse_value(t, like) for t in items)
    # No existing type to follow (e.g. a None field): a Python literal, else the plain string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets, so ``(28,28,1),(32,32,1)`` gives two tuples."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return [*values, current]


def parse_sweep(specs: Sequence[str], config: ml_collections.ConfigDict) -> list[tuple[str, list]]:
    """``["num_clients=5,10", ...]`` -> ``[("num_clients", [5, 10]), ...]``, typed like config.

    Keys are kept as written (``algorithm``), values are parsed to the field's type.
    """
    sweep: list[tuple[str, list]] = []
    seen: dict[str, str] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"--sweep={spec!r} must look like KEY=VALUE1,VALUE2, e.g. --sweep=num_clients=5,10."
            )
        path = resolve_key(config, key)
        if path in seen:
            raise ValueError(
                f"--sweep={spec!r}: config.{path} is already swept by --sweep={seen[path]!r}; "
                "give each field once with all its values."
            )
        seen[path] = spec
        texts = _split_values(raw)
        if any(not t.strip() for t in texts):
            raise ValueError(f"--sweep={spec!r} has an empty value; list values as KEY=V1,V2.")
        current = _get(config, path)
        try:
            values = [parse_value(t, current) for t in texts]
        except ValueError as e:
            raise ValueError(
                f"--sweep={spec!r}: {e} config.{path} is {current!r} ({type(current).__name__})."
            ) from None
        if len(set(map(repr, values))) < len(values):
            raise ValueError(f"--sweep={spec!r} lists a value twice; give each value once.")
        sweep.append((key, values))
    return sweep


def grid(sweep: Sequence[tuple[str, Sequence]]) -> list[Overrides]:
    """Every combination of the swept values, the first key varying slowest (``[{}]`` if none)."""
    keys = [key for key, _ in sweep]
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in sweep))
    ]


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Overrides
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``overrides`` set (string values parsed to the field's type)."""
    new = config.copy_and_resolve_references()
    for key, value in overrides.items():
        path = resolve_key(new, key)
        *parents, leaf = path.split(".")
        node = _get(new, ".".join(parents)) if parents else new
        if isinstance(value, str):
            value = parse_value(value, node[leaf])
        try:
            node[leaf] = value
        except TypeError as e:  # ConfigDict refuses e.g. a float for an int field
            raise ValueError(f"Cannot set config.{path} to {value!r}: {e}") from None
    return new


def _format_value(value: Any) -> str:
    """A short text for a swept value in a directory name."""
    if isinstance(value, tuple | list):
        return "x".join(_format_value(v) for v in value)
    return str(value)


def run_name(overrides: Overrides) -> str:
    """A readable, filesystem-safe directory name, e.g. ``num_clients=5__algorithm=fedavg``."""
    if not overrides:
        return "base"
    name = "__".join(f"{k}={_format_value(v)}" for k, v in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", name)
    if len(name) > _MAX_NAME:  # keep it a valid file name; the hash keeps it unique
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 11]}-{digest}"
    return name


def _rounds_done(rows: Sequence[dict]) -> int:
    """The last round logged (0 if none)."""
    return max((int(r["round"]) for r in rows), default=0)


def _read_json(path: Path) -> dict:
    """A JSON file's object, or ``{}`` if it does not exist."""
    return json.loads(path.read_text()) if path.exists() else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


def _last(rows: Sequence[dict], key: str) -> Any:
    """The last logged value of ``key``, skipping rounds without it (eval not every round)."""
    return next((r[key] for r in reversed(rows) if _is_number(r.get(key))), None)


def _status(record: dict, rounds_done: int, target: int | None) -> str:
    """done/skipped (complete), failed (last attempt raised), incomplete or missing."""
    if record.get("status") == "failed":
        return "failed"
    if target is not None and rounds_done >= target:
        return "skipped" if record.get("status") == "skipped" else "done"
    return "incomplete" if rounds_done else "missing"


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """One summary row for a run directory, from its metrics.jsonl and sweep_run.json."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    record = _read_json(run_dir / RECORD_FILE)
    config = _read_json(run_dir / "config.json")
    target = record.get("rounds", config.get("rounds"))
    m = PRIMARY_METRICS.get(config.get("task", {}).get("name", "classification"), "accuracy")
    evaluated = [r for r in rows if _is_number(r.get(f"test_{m}"))]
    # First round reaching the best score: ties go to the earlier round.
    best = max(evaluated, key=lambda r: r[f"test_{m}"], default=None)
    rounds_done = _rounds_done(rows)
    return {
        "run": run_dir.name,
        **record.get("overrides", {}),
        "status": _status(record, rounds_done, target),
        "rounds_done": rounds_done,
        f"final_test_{m}": _last(rows, f"test_{m}"),
        f"best_test_{m}": best[f"test_{m}"] if best else None,
        "best_round": best["round"] if best else None,
        "final_test_auc": _last(rows, "test_auc"),
        **{
            f"final_{name}_{m}_{stat}": _last(rows, f"{name}_{m}_{stat}")
            for name in ("heldout", "personalized")
            for stat in ("mean", "std")
        },
        "wall_time_s": _last(rows, "wall_time_s"),
        "error": record.get("error"),
    }


def _has(rows: Sequence[dict], key: str) -> bool:
    return any(key in row for row in rows)


def summarize(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One summary row per run directory (missing or failed runs included), in the given order."""
    return [summarize_run(d) for d in run_dirs]


def _columns(rows: Sequence[dict], compact: bool = True) -> list[str]:
    """``run``, then the swept keys in first-seen order, then the :func:`summary_fields` of
    the rows' primary metrics.

    ``compact`` drops the :func:`optional_fields` no row has (for the markdown table).
    """
    metrics = [m for m in dict.fromkeys(PRIMARY_METRICS.values()) if _has(rows, f"final_test_{m}")]
    fields = list(dict.fromkeys(f for m in metrics or ["accuracy"] for f in summary_fields(m)))
    optional = {f for m in metrics or ["accuracy"] for f in optional_fields(m)}
    swept = dict.fromkeys(k for row in rows for k in row if k != "run" and k not in fields)
    shown = [
        f
        for f in fields
        if not compact or f not in optional or any(row.get(f) is not None for row in rows)
    ]
    return ["run", *swept, *shown]


def _md_cell(key: str, value: Any) -> str:
    """A markdown table cell: numbers rounded, errors cut to one short line."""
    if value is None:
        return ""
    if isinstance(value, float) and key != "wall_time_s":
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    text = " ".join(_format_value(value).split())  # one line: errors span several
    if key == "error" and len(text) > 120:
        text = text[:117] + "..."
    return text.replace("|", "\\|")


def to_markdown(rows: Sequence[dict]) -> str:
    """The summary rows as a GitHub-flavoured markdown table."""
    columns = _columns(rows)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(_md_cell(c, row.get(c)) for c in columns) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def write_summary(rows: Sequence[dict], directory: str | Path) -> str:
    """Write ``summary.csv`` and ``summary.md`` into ``directory``; return the markdown."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows, compact=False))
        writer.writeheader()
        writer.writerows(
            # Tuple values (stored as JSON lists) in the same 28x28x1 form as the run names.
            {k: _format_value(v) if isinstance(v, list | tuple) else v for k, v in row.items()}
            for row in rows
        )
    markdown = to_markdown(rows)
    (directory / "summary.md").write_text(markdown)
    return markdown


def _write_record(run_dir: Path, record: dict) -> None:
    (run_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def run_one(
    config: ml_collections.ConfigDict, run_dir: Path, overrides: Overrides, train_fn: TrainFn
) -> str:
    """Train one grid point unless its metrics already reach ``config.rounds``.

    Returns ``"skipped"``, ``"done"`` or ``"failed"``; a failure is recorded, never raised.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"overrides": overrides, "rounds": config.rounds}
    try:
        if _rounds_done(read_metrics(run_dir / "metrics.jsonl")) >= config.rounds:
            # A finished run made with other settings is no result for this grid point.
            check_same_config(run_dir, config)
            status = "skipped"
        else:
            _write_record(run_dir, {**record, "status": "running"})
            train_fn(config, run_dir)  # resumes a partially done run from its checkpoint
            status = "done"
        _write_record(run_dir, {**record, "status": status})
    except Exception as e:  # one bad grid point must not lose the rest of the sweep
        if isinstance(e, UserError):  # its message says what to fix; no traceback
            logging.error("Run %s failed: %s", run_dir.name, e)
        else:
            logging.exception("Run %s failed", run_dir.name)
        _write_record(run_dir, {**record, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        status = "failed"
    return status


def run_sweep(
    config: ml_collections.ConfigDict,
    specs: Sequence[str],
    workdir: str | Path,
    train_fn: TrainFn = train_and_evaluate,
) -> list[dict[str, Any]]:
    """Run the grid of ``specs`` over ``config`` into ``workdir``; write and return the summary.

    Re-running the same sweep skips finished runs and resumes partial ones.
    """
    workdir = Path(workdir)
    points = grid(parse_sweep(specs, config))
    names = [run_name(p) for p in points]
    if len(set(names)) < len(names):
        raise ValueError(
            f"Sweep values give clashing run directory names {names}; "
            "use values that differ in letters or digits."
        )
    # Build and validate every config first, so a bad value fails before hours of training.
    configs = [apply_overrides(config, p) for p in points]
    for run_config in configs:
        validate_config(run_config)
    for i, (point, name, run_config) in enumerate(zip(points, names, configs, strict=True), 1):
        logging.info("Sweep run %d/%d: %s", i, len(points), name)
        status = run_one(run_config, workdir / name, point, train_fn)
        logging.info("Sweep run %d/%d: %s %s", i, len(points), name, status)
    rows = summarize(workdir / name for name in names)
    write_summary(rows, workdir)
    return rows
