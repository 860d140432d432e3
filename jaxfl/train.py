"""``train_and_evaluate(config, workdir)``: the whole experiment behind ``experiments/run.py``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxfl import distributed, factories, runtime
from jaxfl.checkpoint import Checkpointer, check_same_config
from jaxfl.errors import WorkdirError
from jaxfl.metrics import read_metrics
from jaxfl.models import count_params
from jaxfl.personalize import ClientModelEval
from jaxfl.privacy import accounting
from jaxfl.privacy.plan import uncovered_metrics
from jaxfl.tasks import evaluate_clients, evaluate_split, make_stats_fn
from jaxfl.types import FederatedData
from jaxfl.validate import validate_config, validate_dataset


def _use_progress_bar() -> bool:
    """A live bar only on an interactive terminal; plain log lines under CI or in files."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _usable_workdir(workdir: str | os.PathLike) -> Path:
    """``workdir`` as a Path, created and checked writable; a :class:`WorkdirError` otherwise."""
    if not str(workdir).strip():
        raise WorkdirError(
            "the workdir is empty: it would write config.json, metrics.jsonl and checkpoints/ "
            "into the current directory; pass --workdir=DIR (e.g. /tmp/jaxfl_run)."
        )
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir={path} is a file, not a directory; choose another path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".jaxfl_write_test.{os.getpid()}"  # processes may share the workdir
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(
            f"cannot write to --workdir={path} ({e.strerror or e}); choose a writable directory."
        ) from e
    return path


def _truncate_metrics(path: Path, rounds_done: int, write: bool) -> list[dict[str, Any]]:
    """Keep only the rounds covered by the checkpoint we resume from (later ones are redone);
    ``write``: rewrite the file (the process that owns the workdir's files)."""
    kept = [m for m in read_metrics(path) if m["round"] <= rounds_done]
    distributed.barrier("metrics read")  # no process reads the file while it is rewritten
    if write:
        path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    return kept


def load_federated_data(config: ml_collections.ConfigDict) -> FederatedData:
    """CT slices by site for segmentation, CT volumes by site, else the partitioned dataset."""
    if config.task.name == "segmentation":
        return factories.build_segmentation_data(config)
    if config.data.source in factories.VOLUME_SOURCES:
        dataset, site, sites = factories.load_volume_dataset(config)
        validate_dataset(config, dataset)
        return factories.build_volume_data(config, dataset, site, sites)
    dataset = factories.build_dataset(config)
    validate_dataset(config, dataset)
    return factories.build_federated_data(config, dataset)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run ``config.rounds`` federated rounds, evaluating, logging and checkpointing to ``workdir``.

    Writes ``config.json``, one JSON line per round to ``metrics.jsonl`` and orbax checkpoints
    every ``config.checkpoint_every`` rounds. Re-running on the same workdir resumes from the
    last checkpoint (refusing if the config differs). Returns the last round's metrics.
    """
    validate_config(config)
    distributed.initialize(config)
    primary = distributed.is_primary()  # several processes: only process 0 writes files
    workdir = _usable_workdir(workdir)
    metrics_path = workdir / "metrics.jsonl"
    # Only a run with a checkpoint is resumed, so only then must the config match: a run that
    # failed before its first checkpoint never blocks a corrected re-run.
    if any((workdir / "checkpoints").glob("[0-9]*")):
        check_same_config(workdir, config)
    fed = load_federated_data(config)
    distributed.barrier("config checked")  # no process reads config.json while it is written
    if primary:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    checkpointer = Checkpointer(workdir, config.checkpoint_every)
    start_round = min(checkpointer.latest_round(), config.rounds)
    try:
        # The noise each checkpointed round used: epsilon composes what actually ran.
        noise_history = checkpointer.ledger().get("noise_multipliers", [])[:start_round]
        sim = factories.build_simulation(config, fed, noise_history=noise_history)
    except Exception:
        checkpointer.close()
        raise
    task, model, privacy, params = sim.task, sim.model, sim.privacy, sim.params
    runner, algorithm = sim.runner, sim.algorithm
    personalized_eval = factories.build_personalized_eval(config, task, model, runner.backend)
    personal_models = None  # Ditto: every client's own model, evaluated as personalized_*
    if algorithm is not None and algorithm.personal_params is not None:
        personal_models = ClientModelEval(runner.backend, task, model.apply)
    stats_fn = make_stats_fn(task, model.apply)
    state = runner.init(params)

    history = _truncate_metrics(metrics_path, start_round, write=primary)
    if start_round > 0:
        state = runner.restore_state(checkpointer.restore(runner.checkpoint_state(state)))
        logging.info("Resuming %s from the checkpoint after round %d", workdir, start_round)
    if start_round >= config.rounds:
        logging.info(
            "%s already holds all %d rounds; raise --config.rounds to continue it",
            workdir,
            config.rounds,
        )
    else:
        if jax.default_backend() == "cpu":
            logging.info(
                "XLA:CPU: %s; convolutions: %s",
                runtime.cpu_device_choice,
                runtime.cpu_convolution_choice,
            )
        logging.info(
            "%s on %s: %d clients (%d per round), clients run with %s, rounds %d..%d",
            config.algorithm.name,
            fed.name,
            runner.num_clients,
            runner.per_round,
            runner.backend.description,
            start_round + 1,
            config.rounds,
        )
    if privacy.mode != "none":
        skipped = accounting.take_convergence_warnings()
        if skipped:
            logging.info(
                "dp: planned with dp-accounting (%s); its RDP series did not converge for %d "
                "(order, noise) pairs tried, which it leaves out: epsilon is still an upper bound",
                config.dp.accountant,
                skipped,
            )
        warn_if_noise_dominated(privacy, config, np.asarray(fed.train.counts), params)

    # Which source the privacy-relevant draws came from (README: secure randomness).
    randomness = "os_csprng" if config.get("secure_randomness", False) else "seeded"
    elapsed_before = history[-1]["wall_time_s"] if history else 0.0
    start = time.perf_counter()
    metrics: dict[str, Any] = history[-1] if history else {}
    bar = tqdm(
        range(start_round, config.rounds),
        desc="rounds",
        initial=start_round,
        total=config.rounds,
        disable=not (primary and _use_progress_bar()),
    )
    try:
        for r in bar:
            round_start = time.perf_counter()
            state, metrics = runner.run_round(state, r)
            metrics = {"round": r + 1, "dataset": fed.name, "randomness": randomness, **metrics}
            if (r + 1) % config.eval_every == 0 or r + 1 == config.rounds:
                batch = config.eval_batch_size
                if algorithm is None:  # local-only: each client's own model, nothing global
                    per_client = runner.evaluate(state, fed.heldout, model.apply)
                    metrics.update(_per_client("personalized", per_client))
                else:
                    metrics.update(evaluate_split(task, stats_fn, state.params, fed.test, batch))
                    per_client = evaluate_clients(task, stats_fn, state.params, fed.heldout, batch)
                    metrics.update(_per_client("heldout", per_client))
                if personalized_eval is not None:
                    per_client = personalized_eval(state.params, runner.train, fed.heldout, r)
                    metrics.update(_per_client("personalized", per_client))
                if personal_models is not None:
                    personal = algorithm.personal_params(state.clients)
                    metrics.update(
                        _per_client("personalized", personal_models(personal, fed.heldout))
                    )
            metrics.update(privacy.epsilon_metrics(r + 1))
            metrics["round_time_s"] = time.perf_counter() - round_start
            metrics["wall_time_s"] = elapsed_before + time.perf_counter() - start
            if privacy.mode != "none":
                metrics["not_covered_by_epsilon"] = uncovered_metrics(metrics)
            metrics = {k: _jsonable(v) for k, v in metrics.items()}
            if primary:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            ledger = {"noise_multipliers": privacy.ledger(r + 1)} if privacy.epsilons_for else {}
            last = r + 1 == config.rounds
            if checkpointer.due(r + 1, force=last):
                saved = runner.checkpoint_state(state)
                checkpointer.maybe_save(r + 1, saved, ledger, force=last)
            _report(bar, metrics, task, config.rounds, start, r + 1 - start_round)
    finally:
        checkpointer.close()
    return metrics


def _per_client(prefix: str, per_client: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each per-client metric ``[K]`` as ``{prefix}_{name}``, plus its mean and std over clients
    (NaN entries, clients without held-out data, are left out of both)."""
    out: dict[str, Any] = {}
    for name, values in per_client.items():
        key = f"{prefix}_{name}"
        with warnings.catch_warnings():  # all-NaN (no client has held-out data) → NaN, quietly
            warnings.simplefilter("ignore", RuntimeWarning)
            out[f"{key}_mean"] = float(np.nanmean(values))
            out[f"{key}_std"] = float(np.nanstd(values))
        out[key] = values
    return out


def _report(bar, metrics: dict[str, Any], task, rounds: int, start: float, done: int) -> None:
    """Show a round's loss/accuracy on the progress bar, or as a log line without one.

    The log line ends with an ETA from this session's mean time per round (``done`` rounds
    since ``start``), as tqdm shows on a terminal.
    """
    keys = (
        "train_loss",
        *(f"test_{m}" for m in task.headline),
        f"personalized_{task.primary}_mean",
    )
    summary = {k: metrics[k] for k in keys if metrics.get(k) is not None}
    if bar.disable:
        left = rounds - metrics["round"]
        eta = (time.perf_counter() - start) / max(done, 1) * left
        logging.info(
            "round %d/%d %s (%.1fs; ETA %s)",
            metrics["round"],
            rounds,
            " ".join(f"{k}={v:.4f}" for k, v in summary.items()),
            metrics["round_time_s"],
            _duration(eta) if left else "done",
        )
    else:
        bar.set_postfix({k: f"{v:.4f}" for k, v in summary.items()})


def _duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def warn_if_noise_dominated(privacy, config, counts: np.ndarray, params) -> float:
    """Log the plan's noise-to-signal ratio per round; warn when noise swamps every update.

    The ratio compares the noise's L2 norm with the largest signal the clipping allows in what
    a round releases: ``z * sqrt(D / K)`` for the mean of K locally noised updates (local
    update DP), ``z * sqrt(D) / (q K)`` for central DP's noised mean. Above 1 the round's
    update is mostly noise and the run cannot learn. DP-SGD's ratio per step, ``z * sqrt(D) /
    B``, is above 1 for most models and still trains (its noise averages out over many steps),
    so it is only logged. Returns the ratio.
    """
    dim = count_params(params)
    z, k = privacy.noise_multiplier, len(counts)
    if privacy.mode == "record":
        ratio, what = z * np.sqrt(dim) / config.local.batch_size, "each DP-SGD step's batch mean"
    elif privacy.mode == "local_update":
        ratio, what = z * np.sqrt(dim / k), f"the mean of {k} noised updates"
    else:
        expected = privacy.update_dp.expected_clients
        ratio, what = z * np.sqrt(dim) / expected, f"the noised mean over {expected:g} clients"
    logging.info(
        "dp: noise multiplier %.4g on %d parameters: noise/signal %.3g in %s",
        z, dim, ratio, what,
    )  # fmt: skip
    if ratio > 1 and privacy.mode != "record":
        logging.warning(
            "dp: the noise is %.3g x the largest clipped signal in %s: every update is mostly "
            "noise and this run will barely learn. Use more clients (config.num_clients), a "
            "larger budget (config.dp.target_epsilon), fewer rounds (config.rounds), or "
            "record-level DP (config.dp.mode='record').",
            ratio, what,
        )  # fmt: skip
    return float(ratio)
