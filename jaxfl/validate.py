"""Config validation before any data is loaded or anything is traced.

Every problem is reported at once, each naming the config field, what is wrong and a fix, so a
bad command line fails in a second instead of deep inside XLA.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable

import ml_collections
import numpy as np

from jaxfl.backends import PLACEMENTS, STRATEGIES
from jaxfl.data import MissingDataError, medmnist_path
from jaxfl.data.medmnist import MEDMNIST_INFO, missing_data_message
from jaxfl.defaults import OPTIONAL_FIELDS, default_config, flatten_fields
from jaxfl.errors import ConfigError
from jaxfl.factories import (
    ALGORITHMS,
    CT_SOURCES,
    DATA_SOURCES,
    OPTIMIZERS,
    PARTITION_ARGS,
    TASKS,
    VOLUME_SOURCES,
    build_host_aggregator,
    build_shifts,
    clients_per_round,
)
from jaxfl.models import MODELS
from jaxfl.privacy.dp_sgd import PER_EXAMPLE_MODES
from jaxfl.privacy.plan import DP_MODES
from jaxfl.secure.aggregators import AGGREGATORS
from jaxfl.secure.secagg import graph_parameters
from jaxfl.simulate import num_sampled_clients
from jaxfl.types import Dataset

# Two 2x2 poolings (SmallCNN) / two stride-2 convolutions (DPResNet) need at least 4 voxels.
MIN_SPATIAL = 4


@functools.cache
def known_fields() -> frozenset[str]:
    """Every dotted config field jaxfl reads (``jaxfl.defaults``)."""
    return frozenset(flatten_fields(default_config().to_dict())) | frozenset(OPTIONAL_FIELDS)


def unknown_field_errors(config: ml_collections.ConfigDict) -> list[str]:
    """One message per field of ``config`` that jaxfl does not know, with the closest name."""
    known = known_fields()
    errors = []
    for field in sorted(flatten_fields(config.to_dict())):
        if field in known or any(field.startswith(f"{o}.") for o in OPTIONAL_FIELDS):
            continue
        close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
        hint = f"did you mean config.{close[0]}?" if close else "jaxfl/defaults.py lists them"
        errors.append(f"config.{field} is not a known field ({hint}); it would be ignored.")
    return errors


def _choice(errors: list[str], field: str, value, valid) -> None:
    if value not in valid:
        errors.append(f"config.{field}={value!r} is not known; choose one of {tuple(valid)}.")


def _positive(errors: list[str], field: str, value, kind: Callable = int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        errors.append(f"config.{field}={value!r} must be a positive {kind.__name__}.")
    elif kind is int and int(value) != value:
        errors.append(f"config.{field}={value!r} must be a whole number.")


def _distributed_errors(errors: list[str], config: ml_collections.ConfigDict) -> None:
    """``config.distributed``: counts in range, and a strategy whose mesh spans processes."""
    d = config.get("distributed")
    if d is None or not d.enabled:
        return
    if config.strategy not in ("auto", "shard_map"):
        errors.append(
            f"config.strategy={config.strategy!r} runs every client in each process; with "
            "distributed.enabled use strategy 'shard_map' (or 'auto'), whose device mesh spans "
            "the processes."
        )
    if not isinstance(d.num_processes, int) or d.num_processes < 0:
        errors.append(
            f"config.distributed.num_processes={d.num_processes!r} must be an integer >= 0 "
            "(0: from the cluster)."
        )
    elif not isinstance(d.process_id, int) or d.process_id < -1:
        errors.append(
            f"config.distributed.process_id={d.process_id!r} must be an integer >= 0 "
            "(-1: from the cluster)."
        )
    elif d.num_processes and d.process_id >= d.num_processes:
        errors.append(
            f"config.distributed.process_id={d.process_id} must be below "
            f"num_processes={d.num_processes} (ids run 0..{d.num_processes - 1})."
        )
    address = d.coordinator_address
    if address and (not isinstance(address, str) or ":" not in address):
        errors.append(
            f"config.distributed.coordinator_address={address!r} must be 'HOST:PORT' (the "
            "address of process 0, the same for every process), or empty: from the cluster."
        )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check names, ranges and the data file of ``config``; raise :class:`ConfigError`."""
    errors = unknown_field_errors(config)
    if errors:  # the checks below would trip over a misspelled section
        raise ConfigError.of(errors)
    _choice(errors, "algorithm.name", config.algorithm.name, ALGORITHMS)
    _choice(errors, "model.name", config.model.name, MODELS)
    _choice(errors, "partition.name", config.partition.name, PARTITION_ARGS)
    _choice(errors, "task.name", config.task.name, TASKS)
    per_pixel = config.model.name == "unet" or (
        config.model.name == "mlp" and config.model.get("per_pixel", False)
    )
    if config.task.name == "segmentation":
        _choice(errors, "data.source", config.data.source, CT_SOURCES)
        if not per_pixel:
            errors.append(
                f"config.model.name={config.model.name!r} predicts one label per image; "
                "segmentation needs per-pixel logits: use model.name='unet' (or 'mlp' with "
                "model.per_pixel=True)."
            )
    else:
        _choice(errors, "data.source", config.data.source, DATA_SOURCES)
        if per_pixel:
            errors.append(
                f"config.model.name={config.model.name!r} predicts per-pixel logits here; use "
                "it with config.task.name='segmentation'."
            )
    if config.data.source in VOLUME_SOURCES:
        _choice(errors, "data.volume.sites", config.data.volume.sites, ("data", "partition"))
    _choice(errors, "strategy", config.strategy, ("auto", *STRATEGIES))
    _choice(errors, "placement", config.get("placement", "auto"), PLACEMENTS)
    for part in ("local", "server"):
        _choice(errors, f"{part}.optimizer", config[part].optimizer, OPTIMIZERS)
        _positive(errors, f"{part}.learning_rate", config[part].learning_rate, float)
    for field in ("num_clients", "rounds", "eval_every", "eval_batch_size"):
        _positive(errors, field, config[field])
    if config.chunk_size != 0:  # 0 = automatic (jaxfl.memory)
        _positive(errors, "chunk_size", config.chunk_size)
    limit = config.get("memory_limit_gb", 0.0)
    if isinstance(limit, bool) or not isinstance(limit, int | float) or limit < 0:
        errors.append(
            f"config.memory_limit_gb={limit!r} must be a number >= 0 (GiB a chunk of clients "
            "may use with chunk_size=0; 0 = half the device's memory)."
        )
    _positive(errors, "local.batch_size", config.local.batch_size)
    _positive(errors, "local.epochs", config.local.epochs)
    _distributed_errors(errors, config)
    if config.checkpoint_every < 0:
        errors.append(
            f"config.checkpoint_every={config.checkpoint_every} must be >= 0 "
            "(0 saves only after the last round)."
        )
    if not 0 <= config.partition.heldout_fraction < 1:
        errors.append(
            f"config.partition.heldout_fraction={config.partition.heldout_fraction} must be "
            "in [0, 1): it is the share of each client's examples kept for held-out evaluation."
        )
    if config.algorithm.name == "fedprox" and not config.algorithm.mu >= 0:
        errors.append(f"config.algorithm.mu={config.algorithm.mu} must be >= 0 for FedProx.")
    _choice(errors, "client_sampling", config.client_sampling, ("fixed", "poisson"))
    if config.client_sampling == "poisson" and not 0 < config.client_fraction <= 1:
        errors.append(
            f"config.client_sampling='poisson' needs config.client_fraction in (0, 1] (the "
            f"sampling rate), got {config.client_fraction}."
        )
    if config.client_fraction and config.clients_per_round:
        errors.append(
            f"config.clients_per_round={config.clients_per_round} and "
            f"config.client_fraction={config.client_fraction} are both set; set one of them to 0."
        )
    elif isinstance(config.num_clients, int) and config.num_clients > 0:
        try:
            num_sampled_clients(clients_per_round(config), config.num_clients)
        except ValueError as e:
            errors.append(f"config.{e}")
    for field, value in (
        ("secure_randomness", config.get("secure_randomness", False)),
        ("dp.allow_exceeding_budget", config.dp.get("allow_exceeding_budget", False)),
    ):
        if not isinstance(value, bool):
            errors.append(f"config.{field}={value!r} must be True or False.")
    _validate_dp(config, errors)
    _validate_personalization(config, errors)
    _validate_secure(config, errors)
    if config.data.source == "medmnist" and config.data.name.lower() not in MEDMNIST_INFO:
        errors.append(
            f"config.data.name={config.data.name!r} is not a MedMNIST dataset; choose one of "
            f"{', '.join(sorted(MEDMNIST_INFO))} (or config.data.source='synthetic')."
        )
    elif config.data.source == "medmnist" and config.data.get("fallback", "") != "synthetic":
        path = medmnist_path(config.data.name, config.data.data_dir or None, config.data.size)
        if not path.exists():
            raise MissingDataError(missing_data_message(path, config.data.name, config.data.size))
    if errors:
        raise ConfigError.of(errors)


def validate_dataset(config: ml_collections.ConfigDict, dataset: Dataset) -> None:
    """Check that the loaded data fits the config: enough examples, image size for the model."""
    errors: list[str] = []
    n_train = len(dataset.train.labels)
    if config.num_clients > n_train:
        errors.append(
            f"config.num_clients={config.num_clients} but {dataset.name} has only {n_train} "
            "training examples; every client needs at least one. Use fewer clients."
        )
    spatial = dataset.train.images.shape[1:-1]
    if min(spatial) < MIN_SPATIAL:
        errors.append(
            f"config.model.name={config.model.name!r} needs images of at least {MIN_SPATIAL} "
            f"pixels per side, but {dataset.name} images are {spatial}; use larger images "
            "(e.g. config.data.size) or another model."
        )
    try:
        build_shifts(config, is_3d=dataset.train.images.ndim == 5)
    except ValueError as e:
        errors.append(f"config.heterogeneity: {e}")
    if errors:
        raise ConfigError.of(errors, "invalid config for this data")


def _validate_secure(config: ml_collections.ConfigDict, errors: list[str]) -> None:
    """Secure aggregation: a known aggregator whose options build, and no central DP."""
    sec = config.get("secure")
    if sec is None:
        return
    _choice(errors, "secure.aggregator", sec.aggregator, AGGREGATORS)
    if sec.aggregator == "plain" or sec.aggregator not in AGGREGATORS:
        return
    if config.dp.mode == "user_level":
        errors.append(
            "config.dp.mode='user_level' adds noise at the server to the clear sum; with "
            f"secure.aggregator={sec.aggregator!r} use dp.mode='local_update' or 'record'."
        )
    if config.algorithm.name == "local":
        errors.append("algorithm 'local' aggregates nothing; set secure.aggregator='plain'.")
    if config.algorithm.name == "scaffold":
        errors.append(
            f"algorithm 'scaffold' divides the control-variate sum by the number of clients "
            f"on the server, which secure.aggregator={sec.aggregator!r} cannot do; set "
            "secure.aggregator='plain'."
        )
    if sec.max_weight < 0:
        errors.append(f"config.secure.max_weight={sec.max_weight} must be >= 0 (0 = auto).")
    threshold = sec.secagg.threshold
    if sec.aggregator == "secagg" and threshold > 1 and threshold != int(threshold):
        errors.append(
            f"config.secure.secagg.threshold={threshold}: a share count must be a whole number "
            "(a fraction of the shares lies in (0.5, 1])."
        )
        return
    try:  # builds keys/contexts for CKKS: cheap enough (< 1 s) to catch bad parameters early
        aggregator = build_host_aggregator(config, np.ones(config.num_clients))
        if sec.aggregator == "secagg" and isinstance(config.num_clients, int):
            # (k, t) for the clients a round aggregates: checked now, not after round 1.
            per_round = num_sampled_clients(clients_per_round(config), config.num_clients)
            graph_parameters(aggregator.config, max(per_round, 2))
    except (ValueError, TypeError) as e:
        message = str(e).replace("SecAggConfig.", "config.secure.secagg.")
        message = message.replace("CKKSParams.", "config.secure.ckks.")
        errors.append(f"config.secure ({sec.aggregator}): {message}")


def _validate_personalization(config: ml_collections.ConfigDict, errors: list[str]) -> None:
    """Per-FedAvg steps, adapt-then-test evaluation and the local-only baseline's constraints."""
    name = config.algorithm.name
    if name.startswith("perfedavg"):
        if not config.algorithm.alpha >= 0:
            errors.append(f"config.algorithm.alpha={config.algorithm.alpha} must be >= 0.")
        _positive(errors, "algorithm.beta", config.algorithm.beta, float)
    if name.startswith("perfedavg") and config.dp.mode not in ("none", "record"):
        errors.append(
            f"config.dp.mode={config.dp.mode!r} is not supported with algorithm {name!r}: "
            "update-level DP clips FedAvg-style updates; use dp.mode='record' (DP-SGD on every "
            "batch of each Per-FedAvg step) or 'none'."
        )
    momentum = config.local.get("momentum", 0.0)
    if name == "scaffold" and (config.local.optimizer != "sgd" or momentum):
        what = (
            f"local.momentum={momentum}"
            if config.local.optimizer == "sgd"
            else f"local.optimizer={config.local.optimizer!r}"
        )
        errors.append(
            f"algorithm 'scaffold' with {what}: its control-variate update assumes plain local "
            "SGD steps of size local.learning_rate; set local.optimizer='sgd' and "
            "local.momentum=0."
        )
    if name == "scaffold" and config.dp.mode not in ("none", "record"):
        errors.append(
            f"config.dp.mode={config.dp.mode!r} is not supported with algorithm 'scaffold': "
            "update-level DP would clip and noise the model update but not the control "
            "variates; use dp.mode='record' (DP-SGD on every local step) or 'none'."
        )
    if name == "ditto" and not config.algorithm.lam >= 0:
        errors.append(f"config.algorithm.lam={config.algorithm.lam} must be >= 0 for Ditto.")
    p = config.get("personalization")
    if name == "ditto" and p is not None and p.enabled:
        errors.append(
            "algorithm 'ditto' evaluates each client's own personal model as "
            "personalized_*; adapt-then-test would overwrite those metrics. Set "
            "personalization.enabled=False."
        )
    if name == "local" and config.dp.mode != "none":
        errors.append(
            f"config.dp.mode={config.dp.mode!r} is not supported with the local-only baseline "
            "(nothing leaves the clients); use dp.mode='none'."
        )
    if name == "local" and (config.clients_per_round or config.client_fraction):
        errors.append(
            "algorithm 'local' trains every client every round; set clients_per_round=0 and "
            "client_fraction=0."
        )
    if p is not None and p.enabled:
        if not (isinstance(p.adapt_steps, int) and p.adapt_steps >= 0):
            errors.append(
                f"config.personalization.adapt_steps={p.adapt_steps} must be an int >= 0."
            )
        if p.adapt_steps and not p.adapt_lr > 0:
            errors.append(f"config.personalization.adapt_lr={p.adapt_lr} must be > 0.")


def _validate_dp(config: ml_collections.ConfigDict, errors: list[str]) -> None:
    """DP fields: a known mode, positive clip norm and noise, 0 < delta < 1."""
    dp = config.dp
    _choice(errors, "dp.mode", dp.mode, DP_MODES)
    if dp.mode == "none":
        return
    _choice(errors, "dp.accountant", dp.accountant, ("rdp", "pld"))
    _positive(errors, "dp.clip_norm", dp.clip_norm, float)
    _positive(errors, "dp.microbatch_size", dp.microbatch_size)
    _choice(errors, "dp.per_example", dp.per_example, PER_EXAMPLE_MODES)
    if not 0 < dp.delta < 1:
        errors.append(f"config.dp.delta={dp.delta} must be in (0, 1), e.g. 1e-5.")
    if dp.target_epsilon < 0:
        errors.append(f"config.dp.target_epsilon={dp.target_epsilon} must be > 0, or 0 to use "
                      "config.dp.noise_multiplier as given.")  # fmt: skip
    if dp.target_epsilon == 0 and not dp.noise_multiplier >= 0:
        errors.append(f"config.dp.noise_multiplier={dp.noise_multiplier} must be >= 0.")
    if dp.seed_as_coded and dp.mode != "local_update":
        errors.append("config.dp.seed_as_coded applies to dp.mode='local_update' only.")
    if dp.per_round_epsilon and (dp.mode != "local_update" or dp.target_epsilon):
        errors.append(
            f"config.dp.per_round_epsilon={dp.per_round_epsilon} applies to "
            "dp.mode='local_update' without dp.target_epsilon; set one budget, not both."
        )
