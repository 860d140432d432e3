"""Turn ``config.dp`` into the algorithm's DP settings and a per-round accountant.

The noise multiplier the clients use and the one the accountant composes come from the same
:class:`PrivacyPlan`, so the reported epsilon is always the epsilon of the run's exact schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import ml_collections
import numpy as np

from jaxfl.privacy import accounting, calibrate
from jaxfl.privacy.dp_sgd import DPSGD
from jaxfl.privacy.update_dp import UpdateDP

DP_MODES = ("none", "record", "local_update", "user_level")


class PrivacyPlan(NamedTuple):
    """What the algorithm needs (``dp_sgd`` / ``update_dp``) and how to account for it."""

    mode: str
    noise_multiplier: float
    delta: float
    dp_sgd: DPSGD | None
    update_dp: UpdateDP | None
    epsilons_after: Callable[[int], np.ndarray] | None  # rounds -> epsilon per client

    def epsilon_metrics(self, rounds_done: int) -> dict:
        """``epsilon`` (max over clients), ``delta`` and, per client, ``epsilon_per_client``."""
        if self.epsilons_after is None:
            return {}
        eps = self.epsilons_after(rounds_done)
        out = {"epsilon": float(np.max(eps)), "delta": self.delta}
        if eps.size > 1:
            out["epsilon_per_client"] = eps
        return out


def plan_privacy(
    config: ml_collections.ConfigDict,
    client_sizes: np.ndarray,
    clients_per_round: int,
    poisson_rate: float | None = None,
) -> PrivacyPlan:
    """Resolve ``config.dp`` for clients holding ``client_sizes`` training examples.

    Record-level and local-update epsilons assume a client takes part in every round (an upper
    bound under client sampling); user-level DP is accounted with the Poisson client rate.
    """
    dp = config.dp
    if dp.mode == "none":
        return PrivacyPlan("none", 0.0, 0.0, None, None, None)
    rounds, delta, acc = config.rounds, dp.delta, dp.accountant
    batch, epochs = config.local.batch_size, config.local.epochs
    num_clients = len(client_sizes)
    if dp.mode == "user_level" and poisson_rate is None and clients_per_round != num_clients:
        raise ValueError(
            "config.dp.mode='user_level' with client sampling needs Poisson sampling (what the "
            "accountant assumes): set client_sampling='poisson' and client_fraction=q, or "
            "clients_per_round=0 and client_fraction=0 for all clients every round."
        )

    if dp.mode == "record":

        def epsilons_for(z, r):
            return accounting.record_level_epsilons_per_client(
                z, client_sizes, batch, epochs, r, delta, accountant=acc
            )

        # Calibrate the max over clients: each client's epsilon depends on its own size.
        smallest = int(np.min(client_sizes))
        z = _noise(dp, lambda z: float(np.max(epsilons_for(z, rounds))), delta, smallest)

        def epsilons(r):
            return epsilons_for(z, r)

        return PrivacyPlan(
            "record",
            z,
            delta,
            DPSGD(dp.clip_norm, z, dp.microbatch_size, dp.per_example),
            None,
            epsilons,
        )

    if dp.mode == "local_update":
        if dp.seed_as_coded:
            std = accounting.seed_as_coded_noise_std(1.0, dp.seed_epsilon, delta)
            z = std / dp.clip_norm
            real = accounting.epsilon(accounting.local_update_event(z, rounds), delta, acc)
            logging.warning(
                "dp.seed_as_coded: noise std %.4f from sensitivity 1 (Flower LocalDpMod), but "
                "the clipped update's sensitivity is C=%.1f: this run really costs "
                "epsilon=%.1f at delta=%g over %d rounds, not %.1f.",
                std, dp.clip_norm, real, delta, rounds, dp.seed_epsilon,
            )  # fmt: skip
        elif dp.per_round_epsilon > 0:
            # Each round's release is (per_round_epsilon, delta)-DP with the true sensitivity C;
            # the rounds still compose, and the reported epsilon says what the run costs.
            one_round = _event_epsilon(accounting.local_update_event, 1, delta, acc)
            z = calibrate.calibrate_noise_multiplier(one_round, dp.per_round_epsilon, delta)
        else:
            z = _noise(dp, _event_epsilon(accounting.local_update_event, rounds, delta, acc), delta)

        def epsilons(r):
            eps = accounting.epsilon(accounting.local_update_event(z, r), delta, acc)
            return np.full(num_clients, eps)

        update_dp = UpdateDP("local", dp.clip_norm, z * dp.clip_norm)
        return PrivacyPlan("local_update", z, delta, None, update_dp, epsilons)

    if dp.mode == "user_level":
        q = 1.0 if poisson_rate is None else poisson_rate
        user_event = lambda z, r: accounting.user_level_event(z, q, r)
        z = _noise(dp, _event_epsilon(user_event, rounds, delta, acc), delta, num_clients)

        def epsilons(r):
            return np.array([accounting.epsilon(user_event(z, r), delta, acc)])

        # Fixed denominator: the expected number of clients, so one client moves the mean by
        # at most C / (q K) whatever the realized sample.
        update_dp = UpdateDP("central", dp.clip_norm, z * dp.clip_norm, q * num_clients)
        return PrivacyPlan("user_level", z, delta, None, update_dp, epsilons)
    raise ValueError(f"config.dp.mode={dp.mode!r}; choose one of {DP_MODES}.")


def _event_epsilon(make_event, rounds, delta, accountant) -> Callable[[float], float]:
    """``z -> epsilon`` of ``make_event(z, rounds)`` at ``delta``."""
    return lambda z: accounting.epsilon(make_event(z, rounds), delta, accountant)


def _noise(dp, epsilon_fn, delta, num_examples=None) -> float:
    """``dp.noise_multiplier``, or the smallest one meeting ``dp.target_epsilon`` if it is set."""
    if dp.target_epsilon <= 0:
        return float(dp.noise_multiplier)
    z = calibrate.calibrate_noise_multiplier(
        epsilon_fn, dp.target_epsilon, delta, num_examples=num_examples
    )
    logging.info("dp: calibrated noise multiplier %.4f for epsilon=%g", z, dp.target_epsilon)
    return z
