"""Model registry: build a flax module by name and count its parameters."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxfl.models.cnn import SmallCNN
from jaxfl.models.densenet import DenseNet, densenet121
from jaxfl.models.mlp import MLP
from jaxfl.models.resnet import DPResNet
from jaxfl.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {
    "cnn": SmallCNN,
    "dpresnet": DPResNet,
    "densenet": DenseNet,
    "mlp": MLP,
    "unet": UNet,
}

__all__ = [
    "MODELS",
    "DPResNet",
    "DenseNet",
    "MLP",
    "SmallCNN",
    "UNet",
    "count_params",
    "densenet121",
    "get_model",
]


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate the registered model ``name`` with ``num_classes`` outputs."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        valid = ", ".join(sorted(MODELS))
        raise ValueError(f"Unknown model {name!r}; valid names: {valid}") from None
    return cls(num_classes=num_classes, **kwargs)


def count_params(params: Any) -> int:
    """Total number of scalar entries over all leaves of a parameter pytree."""
    # np.shape also accepts jax.ShapeDtypeStruct leaves, so eval_shape'd params work too.
    return sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))
