"""Smoke-test experiment: FedAvg with a small CNN on synthetic 28x28 images, seconds on a CPU.

It is jaxfl's defaults, unchanged: ``jaxfl/defaults.py`` lists every config field with what it
does, and ``python -m experiments.run --config=configs/debug.py --print_config`` prints them.
"""

import ml_collections

from jaxfl.defaults import default_config


def get_config() -> ml_collections.ConfigDict:
    return default_config()
