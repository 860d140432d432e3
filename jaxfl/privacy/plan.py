"""Turn ``config.dp`` into the algorithm's DP settings and a per-round accountant.

The noise multiplier the clients use and the one the accountant composes come from the same
:class:`PrivacyPlan`, so the reported epsilon is always the epsilon of the run's exact schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import ml_collections
import numpy as np

from jaxfl.algorithms.local import SGD, StepRule, dp_draws_per_round
from jaxfl.algorithms.perfedavg import perfedavg_rule
from jaxfl.errors import ConfigError, UserError
from jaxfl.privacy import accounting, calibrate
from jaxfl.privacy.dp_sgd import DPSGD
from jaxfl.privacy.update_dp import UpdateDP

DP_MODES = ("none", "record", "local_update", "user_level")
# A resumed run with a target epsilon keeps within it by raising the remaining rounds' noise, up
# to this factor over a fresh run's; beyond it they would barely learn, so it asks instead.
MAX_SQUEEZE = 2.0


# Metrics computed from client data without noise (or, for timings, depending on Poisson batch
# sizes): published next to a DP run's epsilon, but not covered by it.
UNCOVERED_KEYS = (
    "train_loss",
    "train_accuracy",
    "examples_seen",
    "dp_clipped_fraction",
    "update_clipped_fraction",
    "local_steps_mean",
    "round_time_s",
    "wall_time_s",
)
UNCOVERED_PREFIXES = ("heldout_accuracy", "personalized_accuracy")


def uncovered_metrics(metrics: dict) -> list[str]:
    """The keys of ``metrics`` that a DP run's epsilon does not cover (sorted)."""
    return sorted(k for k in metrics if k in UNCOVERED_KEYS or k.startswith(UNCOVERED_PREFIXES))


class PrivacyBudgetError(UserError, ValueError):
    """Continuing the run would spend more than its configured privacy budget."""


class PrivacyPlan(NamedTuple):
    """What the algorithm needs (``dp_sgd`` / ``update_dp``) and how to account for it.

    ``noise_multiplier`` is what the rounds still to run use; ``history`` holds the noise
    multiplier each round already run used (a resumed run's ledger, from its checkpoint), so
    the reported epsilon is that of the mechanisms that actually ran.
    """

    mode: str
    noise_multiplier: float
    delta: float
    dp_sgd: DPSGD | None
    update_dp: UpdateDP | None
    epsilons_for: Callable[[Sequence[float]], np.ndarray] | None  # per-round z -> eps per client
    history: tuple[float, ...] = ()

    def ledger(self, rounds_done: int) -> list[float]:
        """The noise multiplier of each of the first ``rounds_done`` rounds."""
        done = [float(z) for z in self.history[:rounds_done]]
        return done + [float(self.noise_multiplier)] * (rounds_done - len(done))

    def epsilon_metrics(self, rounds_done: int) -> dict:
        """``epsilon`` (max over clients), ``delta``, this round's ``dp_noise_multiplier`` and,
        per client, ``epsilon_per_client``: the composition of every round run so far."""
        if self.epsilons_for is None:
            return {}
        ledger = self.ledger(rounds_done)
        eps = self.epsilons_for(ledger)
        out = {"epsilon": float(np.max(eps)), "delta": self.delta}
        out["dp_noise_multiplier"] = ledger[-1] if ledger else self.noise_multiplier
        if eps.size > 1:
            out["epsilon_per_client"] = eps
        return out


def local_rule(algorithm: str) -> StepRule:
    """The local-training rule of ``algorithm`` (what fixes the DP draws a round makes)."""
    if algorithm.startswith("perfedavg_"):
        return perfedavg_rule(0.0, algorithm.removeprefix("perfedavg_"))
    return SGD


def plan_privacy(
    config: ml_collections.ConfigDict,
    client_sizes: np.ndarray,
    clients_per_round: int,
    poisson_rate: float | None = None,
    history: Sequence[float] = (),
) -> PrivacyPlan:
    """Resolve ``config.dp`` for clients holding ``client_sizes`` training examples.

    ``history``: the noise multipliers of the rounds a resumed run already ran. With a
    ``target_epsilon``, the remaining rounds get the smallest noise that keeps the whole run
    (history included) within it; if no noise can, :class:`PrivacyBudgetError` is raised unless
    ``dp.allow_exceeding_budget`` (then they get the noise of a fresh run of ``rounds`` rounds
    and the reported epsilon exceeds the target).

    Record-level and local-update epsilons assume a client takes part in every round (an upper
    bound under client sampling); user-level DP is accounted with the Poisson client rate.
    """
    dp = config.dp
    if dp.mode == "none":
        return PrivacyPlan("none", 0.0, 0.0, None, None, None)
    rounds, delta, acc = config.rounds, dp.delta, dp.accountant
    batch, epochs = config.local.batch_size, config.local.epochs
    num_clients = len(client_sizes)
    history = tuple(float(z) for z in history)
    # delta must be far below 1/n for every unit the accountant protects: each record of every
    # client (record, local_update), or each client (user_level).
    covered = num_clients if dp.mode == "user_level" else int(np.max(client_sizes))
    if not delta < 1.0 / covered:
        unit = (
            f"{covered} clients" if dp.mode == "user_level"
            else f"the largest client's {covered} training examples"
        )  # fmt: skip
        raise ConfigError(
            f"config.dp.delta={delta} >= 1/n = {1.0 / covered:.3g} for {unit} "
            f"(dp.mode={dp.mode!r}): such a delta allows leaking a whole "
            f"{'client' if dp.mode == 'user_level' else 'record'}. Use config.dp.delta <= "
            f"{1.0 / (10 * covered):.1e}."
        )
    if dp.mode == "user_level" and poisson_rate is None and clients_per_round != num_clients:
        raise ConfigError(
            "config.dp.mode='user_level' with client sampling needs Poisson sampling (what the "
            "accountant assumes): set client_sampling='poisson' and client_fraction=q, or "
            "clients_per_round=0 and client_fraction=0 for all clients every round."
        )

    if dp.mode == "record":
        rule = local_rule(config.algorithm.name)

        def epsilons_for(zs):
            return accounting.record_level_epsilons_per_client(
                zs, client_sizes, batch, epochs, len(zs), delta, accountant=acc,
                draws_per_round=lambda n: dp_draws_per_round(rule, n, batch, epochs),
            )  # fmt: skip

        # Calibrate the max over clients: each client's epsilon depends on its own size.
        z = _noise(dp, epsilons_for, rounds, history)
        dp_sgd = DPSGD(dp.clip_norm, z, dp.microbatch_size, dp.per_example)
        return PrivacyPlan("record", z, delta, dp_sgd, None, epsilons_for, history)

    if dp.mode == "local_update":
        epsilons_for = _uniform_epsilons(accounting.local_update_event, delta, acc, num_clients)
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
            one_round = lambda z: float(epsilons_for([z])[0])
            z = _calibrate(one_round, dp.per_round_epsilon, delta, "per_round_epsilon")
        else:
            z = _noise(dp, epsilons_for, rounds, history)
        update_dp = UpdateDP("local", dp.clip_norm, z * dp.clip_norm)
        return PrivacyPlan("local_update", z, delta, None, update_dp, epsilons_for, history)

    if dp.mode == "user_level":
        q = 1.0 if poisson_rate is None else poisson_rate
        user_event = lambda z, r: accounting.user_level_event(z, q, r)
        epsilons_for = _uniform_epsilons(user_event, delta, acc, 1)
        z = _noise(dp, epsilons_for, rounds, history)
        # Fixed denominator: the expected number of clients, so one client moves the mean by
        # at most C / (q K) whatever the realized sample.
        update_dp = UpdateDP("central", dp.clip_norm, z * dp.clip_norm, q * num_clients)
        return PrivacyPlan("user_level", z, delta, None, update_dp, epsilons_for, history)
    raise ValueError(f"config.dp.mode={dp.mode!r}; choose one of {DP_MODES}.")


def _uniform_epsilons(
    rounds_event, delta, accountant, size
) -> Callable[[Sequence[float]], np.ndarray]:
    """``zs -> [size]`` copies of the epsilon of the rounds composed with noise ``zs``."""

    def epsilons_for(zs):
        event = accounting.compose_rounds(rounds_event, zs)
        return np.full(size, accounting.epsilon(event, delta, accountant))

    return epsilons_for


def _noise(dp, epsilons_for, rounds: int, history: tuple[float, ...]) -> float:
    """The noise multiplier of the rounds after ``history``: ``dp.noise_multiplier``, or with
    ``dp.target_epsilon`` the smallest one keeping the whole run's max epsilon within it.

    (delta against 1/n is checked once, by :func:`plan_privacy`, for every mode.)"""
    if dp.target_epsilon <= 0:
        return float(dp.noise_multiplier)
    if history and len(history) >= rounds:
        return history[-1]  # nothing left to run: keep the last round's noise for the ledger

    def run_epsilon(z, past=history):
        return float(np.max(epsilons_for([*past, *[z] * (rounds - len(past))])))

    target = dp.target_epsilon
    fresh = _calibrate(lambda z: run_epsilon(z, ()), target, dp.delta)
    if not history:
        logging.info("dp: calibrated noise multiplier %.4f for epsilon=%g", fresh, target)
        return fresh
    total = run_epsilon(fresh)  # the history, then a fresh run's noise
    # A run resumed with its own schedule (killed, same rounds) keeps exactly its noise.
    if total <= target:
        logging.info("dp: calibrated noise multiplier %.4f for epsilon=%g", fresh, target)
        return fresh
    spent = float(np.max(epsilons_for(history)))
    remaining = rounds - len(history)
    message = (
        f"the {len(history)} rounds already run spent epsilon={spent:.4g} of the budget "
        f"dp.target_epsilon={target:g}"
    )
    squeezed = None
    if run_epsilon(calibrate.MAX_NOISE_MULTIPLIER) <= target:
        squeezed = _calibrate(run_epsilon, target, dp.delta)
        # Within twice a fresh run's noise the remaining rounds still learn: stay in budget.
        if squeezed <= MAX_SQUEEZE * fresh:
            logging.info(
                "dp: %s; the remaining rounds use noise multiplier %.4f", message, squeezed
            )
            return squeezed
    if not dp.allow_exceeding_budget:
        within = (
            "no noise keeps the run within it"
            if squeezed is None
            else f"staying within it would need noise multiplier {squeezed:.4g} for the "
            f"remaining {remaining} rounds (a fresh {rounds}-round run uses {fresh:.4g})"
        )
        raise PrivacyBudgetError(
            f"{message}; {within}. Continuing with noise multiplier {fresh:.4g} would end at "
            f"epsilon={total:.4g}: set --config.dp.allow_exceeding_budget=True to spend that, "
            f"or keep --config.rounds={len(history)}."
        )
    logging.warning(
        "%s; dp.allow_exceeding_budget: the remaining %d rounds use noise multiplier %.4f and "
        "the run ends at epsilon=%.4g, above the target.",
        message, remaining, fresh, total,
    )  # fmt: skip
    return fresh


def _calibrate(epsilon_fn, target, delta, field="target_epsilon") -> float:
    """:func:`calibrate.calibrate_noise_multiplier`, its errors naming the config field."""
    try:
        return calibrate.calibrate_noise_multiplier(epsilon_fn, target, delta)
    except ValueError as e:
        raise ConfigError(f"config.dp.{field}={target:g}: {e}") from e
