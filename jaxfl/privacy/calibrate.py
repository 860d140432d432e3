"""Find the smallest noise multiplier that meets a total (epsilon, delta) budget."""

from __future__ import annotations

from collections.abc import Callable

from dp_accounting import dp_event, mechanism_calibration

from jaxfl.privacy.accounting import epsilon, make_accountant

MAX_NOISE_MULTIPLIER = 1e3


def check_budget(target_epsilon: float, delta: float, num_examples: int | None = None) -> None:
    """Reject impossible or meaningless budgets with a message saying how to fix them."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    if num_examples is not None and delta >= 1.0 / num_examples:
        raise ValueError(
            f"delta={delta} >= 1/n = {1.0 / num_examples:.3g} for n={num_examples} records: "
            f"such a delta allows leaking a whole record. Use delta << 1/n, e.g. "
            f"{1.0 / (10 * num_examples):.1e}."
        )


def calibrate_noise_multiplier(
    make_event: Callable[[float], dp_event.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    num_examples: int | None = None,
) -> float:
    """Smallest noise multiplier ``z`` with ``epsilon(make_event(z), delta) <= target_epsilon``."""
    check_budget(target_epsilon, delta, num_examples)
    make_accountant(accountant)  # validates the name before searching
    if epsilon(make_event(MAX_NOISE_MULTIPLIER), delta, accountant) > target_epsilon:
        raise ValueError(
            f"epsilon={target_epsilon} at delta={delta} is unreachable for this schedule even "
            f"with noise multiplier {MAX_NOISE_MULTIPLIER:g}: raise epsilon or delta, or train "
            "for fewer rounds/steps."
        )
    z = mechanism_calibration.calibrate_dp_mechanism(
        lambda: make_accountant(accountant),
        make_event,
        target_epsilon,
        delta,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER),
        tol=1e-4,
    )
    # Brent's method returns within tol of the boundary; step up until the budget holds.
    while epsilon(make_event(z), delta, accountant) > target_epsilon:
        z *= 1.0 + 1e-4
    return float(z)
