"""Accounting and calibration: dp_accounting as the reference, monotonicity, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from jaxfl.privacy import accounting
from jaxfl.privacy.calibrate import calibrate_noise_multiplier, check_budget


@pytest.mark.parametrize(
    "name,make",
    [
        ("rdp", rdp_privacy_accountant.RdpAccountant),
        ("pld", pld_privacy_accountant.PLDAccountant),
    ],
)
def test_epsilon_equals_direct_dp_accounting(name, make):
    # 3 epochs of batch 32 on a 960-example client for 50 rounds: q = 1/30, 90 steps a round.
    direct = make()
    event = dp_event.PoissonSampledDpEvent(32 / 960, dp_event.GaussianDpEvent(1.1))
    direct.compose(dp_event.SelfComposedDpEvent(event, 3 * 30 * 50))
    ours = accounting.epsilon(accounting.client_dp_sgd_event(1.1, 960, 32, 3, 50), 1e-5, name)
    assert ours == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    by_rounds = [
        accounting.epsilon(accounting.local_update_event(2.0, r), 1e-5) for r in (1, 5, 50)
    ]
    by_noise = [accounting.epsilon(accounting.local_update_event(z, 10), 1e-5) for z in (1, 2, 4)]
    assert by_rounds == sorted(by_rounds) and by_rounds[0] < by_rounds[-1]
    assert by_noise == sorted(by_noise, reverse=True) and by_noise[0] > by_noise[-1]


def test_smaller_clients_pay_more():
    eps = accounting.record_level_epsilons_per_client(1.0, [100, 1000, 100], 32, 1, 5, 1e-5)
    assert eps[0] == eps[2] > eps[1]


@pytest.mark.parametrize(
    "make_event",
    [
        lambda z: accounting.client_dp_sgd_event(z, 500, 32, 3, 50),
        lambda z: accounting.local_update_event(z, 50),
        lambda z: accounting.user_level_event(z, 1.0, 50),
    ],
)
def test_calibration_meets_the_target_nearly_tightly(make_event):
    def eps(z):
        return accounting.epsilon(make_event(z), 1.9e-4)

    z = calibrate_noise_multiplier(eps, 6.0, 1.9e-4)
    assert eps(z) <= 6.0
    assert accounting.epsilon(make_event(z * 0.98), 1.9e-4) > 6.0


def test_budget_errors():
    with pytest.raises(ValueError, match="delta << 1/n"):
        check_budget(6.0, 1e-2, num_examples=500)
    with pytest.raises(ValueError, match="delta must be in"):
        check_budget(6.0, 0.0)
    with pytest.raises(ValueError, match="target epsilon must be > 0"):
        check_budget(0.0, 1e-5)
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(
            lambda z: accounting.epsilon(accounting.local_update_event(z, 10**9), 1e-12),
            1e-3,
            1e-12,
        )
    with pytest.raises(ValueError, match="accountant"):
        accounting.make_accountant("moments")


def test_seed_as_coded_noise_and_its_real_epsilon():
    std = accounting.seed_as_coded_noise_std(1.0, 6.0, 1.9e-4)
    assert std == pytest.approx(np.sqrt(2 * np.log(1.25 / 1.9e-4)) / 6.0)
    assert std == pytest.approx(0.70, abs=0.01)
    real = accounting.epsilon(accounting.local_update_event(std / 7.0, 50), 1.9e-4)
    assert real > 100 * 6.0  # the clipped update's sensitivity is C = 7, and 50 rounds compose
