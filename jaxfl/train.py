"""``train_and_evaluate(config, workdir)``: the whole experiment behind ``experiments/run.py``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxfl import factories
from jaxfl.evaluate import evaluate_clients, evaluate_global, make_predict_fn
from jaxfl.simulate import INIT_STREAM, Simulator


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run ``config.rounds`` federated rounds, evaluating and logging to ``workdir``.

    Writes ``config.json`` and one JSON line per round to ``metrics.jsonl``; returns the last
    round's metrics.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    dataset = factories.build_dataset(config)
    fed = factories.build_federated_data(config, dataset)
    model = factories.build_model(config, fed.num_classes)
    algorithm = factories.build_algorithm(config, model)
    init_key = jax.random.fold_in(jax.random.key(config.seed), INIT_STREAM)
    params = factories.init_params(model, fed.train.images[0], init_key)
    sim = Simulator(
        algorithm,
        fed.train,
        seed=config.seed,
        strategy=config.strategy,
        chunk_size=config.chunk_size,
        clients_per_round=config.clients_per_round,
    )
    logging.info(
        "%s on %s: %d clients (%d per round), strategy %s, %d rounds",
        algorithm.name,
        fed.name,
        sim.num_clients,
        sim.per_round,
        sim.strategy,
        config.rounds,
    )
    predict_fn = make_predict_fn(model.apply)
    state = algorithm.init(params)

    metrics_path = workdir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    start = time.perf_counter()
    bar = tqdm(range(config.rounds), desc="rounds", disable=not _use_progress_bar())
    metrics: dict[str, Any] = {}
    for r in bar:
        round_start = time.perf_counter()
        state, metrics = sim.run_round(state, r)
        metrics = {"round": r + 1, **metrics}
        if (r + 1) % config.eval_every == 0 or r + 1 == config.rounds:
            metrics.update(
                evaluate_global(predict_fn, state.params, fed.test, config.eval_batch_size)
            )
            per_client = evaluate_clients(
                predict_fn, state.params, fed.heldout, config.eval_batch_size
            )
            metrics["heldout_accuracy_mean"] = float(np.nanmean(per_client))
            metrics["heldout_accuracy"] = per_client
        metrics["round_time_s"] = time.perf_counter() - round_start
        metrics["wall_time_s"] = time.perf_counter() - start
        with metrics_path.open("a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")
        summary = {k: metrics[k] for k in ("train_loss", "test_accuracy") if k in metrics}
        if bar.disable:
            logging.info(
                "round %d/%d %s (%.1fs)",
                r + 1,
                config.rounds,
                " ".join(f"{k}={v:.4f}" for k, v in summary.items()),
                metrics["round_time_s"],
            )
        else:
            bar.set_postfix({k: f"{v:.4f}" for k, v in summary.items()})
    return metrics
