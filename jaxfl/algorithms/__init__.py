"""Federated algorithms, each written for one client."""

from jaxfl.algorithms.base import (
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    ServerState,
    classification_loss,
    local_train,
    server_apply,
)
from jaxfl.algorithms.fedavg import fedavg, fedprox

__all__ = [
    "ClientOutput",
    "FederatedAlgorithm",
    "LossFn",
    "ServerState",
    "classification_loss",
    "fedavg",
    "fedprox",
    "local_train",
    "server_apply",
]
