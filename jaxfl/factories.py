"""The only place a config (``ml_collections.ConfigDict``) is turned into objects."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxfl.algorithms import FederatedAlgorithm, classification_loss, fedavg, fedprox
from jaxfl.data import build_federated, load_medmnist, partition, synthetic_dataset
from jaxfl.models import get_model
from jaxfl.privacy.plan import PrivacyPlan
from jaxfl.types import Dataset, FederatedData

ALGORITHMS = ("fedavg", "fedprox")
OPTIMIZERS = ("sgd", "adam", "adamw")
DATA_SOURCES = ("synthetic", "medmnist")
# Which config.partition fields each partitioner takes.
PARTITION_ARGS = {
    "iid": (),
    "dirichlet": ("alpha",),
    "quantity_skew": ("sigma",),
    "pathological": ("classes_per_client",),
    "bloodmnist_paper": (),
}


def build_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The centralized dataset named by ``config.data`` (synthetic or a MedMNIST ``.npz``)."""
    data = config.data
    if data.source == "synthetic":
        return synthetic_dataset(
            num_classes=data.num_classes,
            image_shape=tuple(data.image_shape),
            n_train=data.n_train,
            n_val=data.n_val,
            n_test=data.n_test,
            seed=config.seed,
            noise=data.noise,
            name=data.name,
        )
    if data.source == "medmnist":
        return load_medmnist(data.name, data_dir=data.data_dir or None, size=data.size)
    raise ValueError(f"config.data.source={data.source!r}; choose one of {DATA_SOURCES}.")


def build_federated_data(config: ml_collections.ConfigDict, dataset: Dataset) -> FederatedData:
    """Partition ``dataset``'s training split over ``config.num_clients`` clients."""
    p = config.partition
    if p.name not in PARTITION_ARGS:
        raise ValueError(
            f"config.partition.name={p.name!r}; choose one of {tuple(PARTITION_ARGS)}."
        )
    kwargs = {k: p[k] for k in PARTITION_ARGS[p.name]}
    # partition.seed, when set, pins the split independently of the training seed (the BloodMNIST
    # paper's split uses numpy seed 42 whatever the run's seed).
    seed = p.get("seed", config.seed)
    indices = partition(p.name, dataset.train.labels, config.num_clients, seed, **kwargs)
    return build_federated(dataset, indices, heldout_fraction=p.heldout_fraction, seed=config.seed)


def clients_per_round(config: ml_collections.ConfigDict) -> int | float:
    """The simulator's sampling spec: ``client_fraction`` if set, else the count (0 = all)."""
    return config.client_fraction if config.client_fraction else config.clients_per_round


def poisson_rate(config: ml_collections.ConfigDict) -> float | None:
    """The Poisson client-sampling rate, or None for fixed-size sampling."""
    return config.client_fraction if config.client_sampling == "poisson" else None


def build_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """An optax optimizer from ``{optimizer, learning_rate, momentum?, weight_decay?}``."""
    if opt.optimizer == "sgd":
        return optax.sgd(opt.learning_rate, momentum=opt.get("momentum") or None)
    if opt.optimizer == "adam":
        return optax.adam(opt.learning_rate)
    if opt.optimizer == "adamw":
        return optax.adamw(opt.learning_rate, weight_decay=opt.get("weight_decay", 1e-4))
    raise ValueError(f"optimizer {opt.optimizer!r}; choose one of {OPTIMIZERS}.")


def build_algorithm(
    config: ml_collections.ConfigDict, model, privacy: PrivacyPlan | None = None
) -> FederatedAlgorithm:
    """The federated algorithm named by ``config.algorithm.name`` for a flax ``model``."""
    loss = classification_loss(model.apply)
    client_opt = build_optimizer(config.local)
    server_opt = build_optimizer(config.server)
    kw = dict(batch_size=config.local.batch_size, epochs=config.local.epochs)
    if privacy is not None:
        kw.update(dp=privacy.dp_sgd, update_dp=privacy.update_dp)
    name = config.algorithm.name
    if name == "fedavg":
        return fedavg(loss, client_opt, server_opt, **kw)
    if name == "fedprox":
        return fedprox(loss, client_opt, server_opt, mu=config.algorithm.mu, **kw)
    raise ValueError(f"config.algorithm.name={name!r}; choose one of {ALGORITHMS}.")


def init_params(model, sample_images: jax.Array, key: jax.Array):
    """Initialize ``model``'s params for inputs shaped like one example of ``sample_images``."""
    params = model.init(key, jnp.zeros((1, *sample_images.shape[1:]), jnp.float32))["params"]
    logging.info(
        "Model %s: %d parameters",
        type(model).__name__,
        sum(x.size for x in jax.tree.leaves(params)),
    )
    return params


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The flax model named by ``config.model.name``."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    return get_model(config.model.name, num_classes, **kwargs)
