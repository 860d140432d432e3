"""Privacy accounting with ``dp_accounting`` (RDP or PLD) for the run's exact schedule.

Every mode is a ``DpEvent`` composed over the run; ``epsilon(event, delta)`` asks a fresh
accountant. No hand-written RDP.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

ACCOUNTANTS = ("rdp", "pld")


class _CountConvergenceWarnings(logging.Filter):
    """Drops dp-accounting's per-order "failed to converge" warnings, counting them.

    The RDP accountant logs one for every Rényi order whose series does not converge and then
    leaves that order out, so epsilon stays a valid (slightly looser) bound; a calibration makes
    hundreds of such calls. :func:`take_convergence_warnings` reports the count once.
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "failed to converge" in record.getMessage():
            self.count += 1
            return False
        return True


_CONVERGENCE = _CountConvergenceWarnings()


@contextlib.contextmanager
def _quiet_accountant():
    logger = logging.getLogger("absl")
    logger.addFilter(_CONVERGENCE)
    try:
        yield
    finally:
        logger.removeFilter(_CONVERGENCE)


def take_convergence_warnings() -> int:
    """How many per-order convergence warnings were dropped since the last call (then 0)."""
    count, _CONVERGENCE.count = _CONVERGENCE.count, 0
    return count


def make_accountant(accountant: str = "rdp"):
    """A fresh dp_accounting accountant: ``rdp`` (Rényi DP) or ``pld`` (privacy loss dist.)."""
    if accountant == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant()
    raise ValueError(f"accountant={accountant!r}; choose one of {ACCOUNTANTS}.")


def epsilon(event: dp_event.DpEvent, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``event`` at ``delta``."""
    acc = make_accountant(accountant)
    with _quiet_accountant():
        acc.compose(event)
        return float(acc.get_epsilon(delta))


def dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_event.DpEvent:
    """Record-level DP-SGD: ``steps`` Poisson-subsampled Gaussian mechanisms (Abadi et al.)."""
    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        gaussian = dp_event.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dp_event.SelfComposedDpEvent(gaussian, int(steps))


def client_dp_sgd_event(
    noise_multiplier: float,
    client_size: int,
    batch_size: int,
    epochs: int,
    rounds: int,
    draws_per_round: Callable[[int], int] | None = None,
) -> dp_event.DpEvent:
    """One client's DP-SGD over the run: rate ``B / n``, ``draws_per_round(n)`` privatized draws
    a round (default ``epochs * ceil(n / B)``, FedAvg's local SGD).

    The schedule :func:`jaxfl.algorithms.local.local_train` runs with DP (its
    :func:`~jaxfl.algorithms.local.dp_draws_per_round` counts every draw of a Per-FedAvg step),
    for a client taking part in every round (the worst case when clients are sampled).
    """
    n = max(int(client_size), 1)
    per_round = (
        epochs * math.ceil(n / batch_size) if draws_per_round is None else draws_per_round(n)
    )
    return dp_sgd_event(noise_multiplier, min(1.0, batch_size / n), per_round * rounds)


RoundsEvent = Callable[[float, int], dp_event.DpEvent]  # (noise multiplier, rounds) -> event


def compose_rounds(
    rounds_event: RoundsEvent, noise_multipliers: Sequence[float]
) -> dp_event.DpEvent:
    """The event of a run whose round ``i`` used ``noise_multipliers[i]``.

    Consecutive rounds with the same noise are one ``rounds_event(z, count)`` (so a constant
    schedule is exactly the event of the whole run); a resumed run whose noise changed is the
    composition of its pieces.
    """
    pieces = [
        rounds_event(float(z), len(list(group)))
        for z, group in itertools.groupby(float(z) for z in noise_multipliers)
    ]
    if not pieces:
        return dp_event.NoOpDpEvent()
    return pieces[0] if len(pieces) == 1 else dp_event.ComposedDpEvent(pieces)


def record_level_epsilons_per_client(
    noise_multiplier: float | Sequence[float],
    client_sizes: Sequence[int],
    batch_size: int,
    epochs: int,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    draws_per_round: Callable[[int], int] | None = None,
) -> np.ndarray:
    """Each client's epsilon from its own data size (fewer examples → higher rate → larger ε).

    ``noise_multiplier`` is one value for all ``rounds``, or one per round (``rounds`` is then
    its length); ``draws_per_round`` as in :func:`client_dp_sgd_event`.
    """
    zs = (
        [float(noise_multiplier)] * rounds
        if np.ndim(noise_multiplier) == 0
        else [float(z) for z in noise_multiplier]
    )
    sizes = np.asarray(client_sizes, np.int64)
    cache = {}
    for n in np.unique(sizes):

        def rounds_event(z, r, n=int(n)):
            return client_dp_sgd_event(z, n, batch_size, epochs, r, draws_per_round)

        cache[int(n)] = epsilon(compose_rounds(rounds_event, zs), delta, accountant)
    return np.array([cache[int(n)] for n in sizes])


def local_update_event(noise_multiplier: float, rounds: int) -> dp_event.DpEvent:
    """Local update DP: a clipped update plus ``N(0, (z C)^2)`` released once per round."""
    return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(noise_multiplier), int(rounds))


def user_level_event(
    noise_multiplier: float, client_sampling_rate: float, rounds: int
) -> dp_event.DpEvent:
    """Central DP-FedAvg (McMahan et al. 2018): Gaussian on the sum of clipped updates."""
    return dp_sgd_event(noise_multiplier, client_sampling_rate, rounds)


def seed_as_coded_noise_std(sensitivity: float = 1.0, epsilon_: float = 6.0, delta: float = 1.9e-4):
    """The noise std Flower's ``LocalDpMod`` adds: ``sensitivity * sqrt(2 ln(1.25/δ)) / ε``.

    The classic Gaussian-mechanism formula; a valid (ε, δ) bound only for ε < 1, and the seed
    paper's code uses it with sensitivity 1 although its clipped updates have sensitivity C.
    """
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon_
