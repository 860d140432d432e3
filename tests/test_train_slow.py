"""Slow end-to-end checks (``pytest -m slow``): the paper's DPResNet inside the engine."""

from __future__ import annotations

import numpy as np
import pytest

from configs import debug
from jaxfl.train import train_and_evaluate


@pytest.mark.slow
def test_dpresnet_round_on_rgb_synthetic(tmp_path):
    config = debug.get_config()
    config.model.name = "dpresnet"
    config.data.image_shape = (28, 28, 3)
    config.data.n_train = 200
    config.num_clients = 4
    config.rounds = 1
    final = train_and_evaluate(config, tmp_path)
    assert np.isfinite(final["train_loss"])
    assert 0.0 <= final["test_accuracy"] <= 1.0
