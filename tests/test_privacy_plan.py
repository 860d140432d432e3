"""config.dp → algorithm settings and per-round epsilon; DP runs end to end."""

from __future__ import annotations

import numpy as np
import pytest

from configs import bloodmnist_dp, bloodmnist_dp_seed_as_coded, debug
from jaxfl.metrics import read_metrics
from jaxfl.privacy.plan import plan_privacy
from jaxfl.sweep import apply_overrides
from jaxfl.train import train_and_evaluate
from jaxfl.validate import ConfigError, validate_config

SIZES = np.array([300, 800, 1200])


def _dp_config(**overrides):
    return apply_overrides(bloodmnist_dp.get_config(), {"num_clients": 3, **overrides})


@pytest.mark.parametrize("mode", ["record", "local_update", "user_level"])
def test_calibrated_plan_meets_the_total_budget(mode):
    plan = plan_privacy(_dp_config(**{"dp.mode": mode}), SIZES, 3)
    final = plan.epsilon_metrics(50)
    assert final["epsilon"] <= 6.0 + 1e-9 and final["epsilon"] > 5.9
    assert plan.epsilon_metrics(10)["epsilon"] < final["epsilon"]
    assert (plan.dp_sgd is not None) == (mode == "record")
    if mode == "record":  # each client's own size: the smallest pays the most
        eps = final["epsilon_per_client"]
        assert eps[0] == final["epsilon"] and eps[0] > eps[1] > eps[2]


def test_noise_multiplier_used_as_given_without_target():
    config = _dp_config(**{"dp.mode": "local_update", "dp.target_epsilon": 0.0})
    config.dp.noise_multiplier = 2.5
    plan = plan_privacy(config, SIZES, 3)
    assert plan.noise_multiplier == 2.5
    assert plan.update_dp.noise_std == pytest.approx(2.5 * 7.0)


def test_seed_as_coded_reports_its_real_epsilon(caplog):
    config = apply_overrides(bloodmnist_dp_seed_as_coded.get_config(), {"num_clients": 3})
    plan = plan_privacy(config, SIZES, 3)
    assert plan.update_dp.noise_std == pytest.approx(0.699, abs=1e-3)
    assert plan.epsilon_metrics(50)["epsilon"] > 1000
    assert "really costs" in caplog.text


def test_user_level_needs_every_client_each_round():
    with pytest.raises(ValueError, match="client_sampling=.poisson."):
        plan_privacy(_dp_config(**{"dp.mode": "user_level"}), SIZES, 2)


def test_impossible_delta_is_refused_before_training():
    with pytest.raises(ValueError, match="allows leaking a whole record"):
        plan_privacy(_dp_config(**{"dp.mode": "record", "dp.delta": 0.01}), SIZES, 3)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dp.mode", "gdp", "config.dp.mode='gdp' is not known"),
        ("dp.delta", 1.5, "config.dp.delta=1.5 must be in (0, 1)"),
        ("dp.clip_norm", 0.0, "config.dp.clip_norm=0.0 must be a positive"),
        ("dp.accountant", "moments", "config.dp.accountant='moments' is not known"),
    ],
)
def test_dp_config_errors(field, value, message):
    config = apply_overrides(debug.get_config(), {"dp.mode": "record", field: value})
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert message in str(e.value)


def test_record_level_run_logs_growing_epsilon(tmp_path):
    config = apply_overrides(
        debug.get_config(),
        {
            "rounds": 2,
            "num_clients": 3,
            "data.n_train": 150,
            "data.n_test": 40,
            "local.epochs": 1,
            "dp.mode": "record",
            "dp.target_epsilon": 4.0,
            "dp.delta": 1e-3,
        },
    )
    train_and_evaluate(config, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["epsilon"] < rows[1]["epsilon"] <= 4.0
    assert len(rows[1]["epsilon_per_client"]) == 3 and rows[1]["delta"] == 1e-3
    assert 0.0 <= rows[1]["dp_clipped_fraction"] <= 1.0


@pytest.mark.parametrize("module", ["jaxfl.privacy.plan", "jaxfl.privacy.dp_sgd", "jaxfl.train"])
def test_modules_import_first_in_a_fresh_process(module):
    # Regression: importing jaxfl.privacy before jaxfl.algorithms once hit an import cycle.
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


def test_per_round_budget_calibrates_one_round_and_reports_the_composition():
    config = _dp_config(
        **{"dp.mode": "local_update", "dp.target_epsilon": 0.0, "dp.per_round_epsilon": 2.0}
    )
    plan = plan_privacy(config, SIZES, 3)
    one = plan.epsilon_metrics(1)["epsilon"]
    assert 1.99 < one <= 2.0
    assert plan.epsilon_metrics(50)["epsilon"] > 5 * one  # 50 rounds compose


def test_per_round_and_total_budget_are_exclusive():
    config = apply_overrides(
        debug.get_config(),
        {"dp.mode": "local_update", "dp.target_epsilon": 6.0, "dp.per_round_epsilon": 1.0},
    )
    with pytest.raises(ConfigError, match="set one budget, not both"):
        validate_config(config)


def test_user_level_with_poisson_client_sampling():
    config = _dp_config(**{"dp.mode": "user_level", "dp.target_epsilon": 0.0})
    config.dp.noise_multiplier = 1.0
    full = plan_privacy(config, SIZES, 3)
    sampled = plan_privacy(config, SIZES, 3, poisson_rate=0.3)
    assert sampled.update_dp.expected_clients == pytest.approx(0.9)
    assert sampled.epsilon_metrics(50)["epsilon"] < full.epsilon_metrics(50)["epsilon"]


def test_user_level_poisson_run_end_to_end(tmp_path):
    config = apply_overrides(
        debug.get_config(),
        {
            "rounds": 2,
            "num_clients": 6,
            "data.n_train": 240,
            "data.n_test": 40,
            "local.epochs": 1,
            "client_sampling": "poisson",
            "client_fraction": 0.5,
            "dp.mode": "user_level",
            "dp.target_epsilon": 10.0,
            "dp.delta": 1e-3,
        },
    )
    validate_config(config)
    train_and_evaluate(config, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["epsilon"] < rows[1]["epsilon"] <= 10.0
    assert all(0 <= r["clients"] <= 6 for r in rows)
