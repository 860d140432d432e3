"""Federated algorithms, each written for one client."""

from jaxfl.algorithms.base import (
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    ServerState,
    classification_loss,
    server_apply,
)
from jaxfl.algorithms.fedavg import fedavg, fedprox
from jaxfl.algorithms.local import SGD, StepRule, local_train

__all__ = [
    "ClientOutput",
    "FederatedAlgorithm",
    "LossFn",
    "SGD",
    "ServerState",
    "StepRule",
    "classification_loss",
    "fedavg",
    "fedprox",
    "local_train",
    "server_apply",
]
