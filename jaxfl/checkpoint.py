"""Checkpoint and resume with orbax: server state + round (+ every client's state for
stateful algorithms, in ``ServerState.clients``) + the privacy ledger, plus a config guard for
the workdir.

Randomness needs no saved state: every key is ``fold_in`` of the seed's streams with the round
(and client id), so restoring the server state and the round number reproduces the rest. The
privacy ledger (the noise multiplier each round used) is saved with the state, so a resumed
run accounts for the mechanisms that actually ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxfl import distributed
from jaxfl.algorithms.base import ServerState
from jaxfl.defaults import flatten_fields
from jaxfl.errors import UserError

# Fields that may change between a run and its resumption without changing its results.
# How many processes run it is one of them: results are the same on one or several.
RESUMABLE_FIELDS = frozenset(
    {
        "rounds",
        "checkpoint_every",
        "dp.allow_exceeding_budget",
        "distributed.enabled",
        "distributed.coordinator_address",
        "distributed.num_processes",
        "distributed.process_id",
    }
)


class ConfigMismatchError(UserError, RuntimeError):
    """The workdir holds a run made with a different config."""


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), as stored in ``config.json``."""
    return json.loads(config.to_json_best_effort())


def check_same_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigMismatchError` if ``workdir/config.json`` differs from ``config``."""
    path = workdir / "config.json"
    if not path.exists():
        return
    old = flatten_fields(json.loads(path.read_text()))
    new = flatten_fields(config_to_dict(config))
    diffs = [
        f"  {k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
        for k in sorted(old.keys() | new.keys())
        if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k)
    ]
    if diffs:
        raise ConfigMismatchError(
            f"{workdir} holds a run made with a different config, so it cannot be resumed:\n"
            + "\n".join(diffs)
            + f"\nUse a new --workdir, or delete {workdir} to start over."
        )


class Checkpointer:
    """Saves the server state and a JSON ledger every ``every`` rounds under
    ``workdir/checkpoints`` (one orbax step per saved round, items ``state`` and ``ledger``)."""

    def __init__(self, workdir: Path, every: int, max_to_keep: int = 2):
        self.every = every
        self.directory = (workdir / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_round(self) -> int:
        """Number of rounds completed by the newest checkpoint (0 if none)."""
        return self.manager.latest_step() or 0

    def ledger(self) -> dict[str, Any]:
        """The newest checkpoint's ledger (``{}`` without a checkpoint)."""
        step = self.latest_round()
        if step == 0:
            return {}
        if not (self.directory / str(step) / "ledger").exists():
            raise ConfigMismatchError(
                f"{self.directory / str(step)} was written by an older jaxfl without a privacy "
                "ledger, so its rounds cannot be accounted for; use a new --workdir."
            )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(ledger=ocp.args.JsonRestore())
        )
        return dict(restored["ledger"])

    def restore(self, like: ServerState) -> ServerState:
        """The newest checkpoint's state, restored into the structure of ``like``."""
        if distributed.multi_process():
            abstract = distributed.global_like(like)
        else:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(
            self.latest_round(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
        )
        return distributed.to_local(restored["state"], like)

    def due(self, rounds_done: int, force: bool = False) -> bool:
        """Whether :meth:`maybe_save` would save after ``rounds_done`` rounds."""
        due = force or (self.every > 0 and rounds_done % self.every == 0)
        return due and self.manager.latest_step() != rounds_done

    def maybe_save(
        self,
        rounds_done: int,
        state: ServerState,
        ledger: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        """Save after ``rounds_done`` rounds if it is a checkpoint round (or ``force``)."""
        if self.due(rounds_done, force):
            self.manager.save(
                rounds_done,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(distributed.to_global(state)),
                    ledger=ocp.args.JsonSave(ledger or {}),
                ),
            )

    def close(self) -> None:
        """Wait for pending asynchronous saves."""
        self.manager.wait_until_finished()
        self.manager.close()
