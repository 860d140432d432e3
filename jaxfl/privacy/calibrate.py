"""Find the smallest noise multiplier that meets a total (epsilon, delta) budget."""

from __future__ import annotations

import math
from collections.abc import Callable

MAX_NOISE_MULTIPLIER = 1e3
# Below this the PLD accountant's discretization blows up, and epsilon is in the hundreds for
# any realistic schedule; a target that loose gets this much noise (more than needed, still valid).
MIN_NOISE_MULTIPLIER = 0.1


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
    epsilon_fn: Callable[[float], float],
    target_epsilon: float,
    delta: float,
    num_examples: int | None = None,
    rtol: float = 1e-4,
) -> float:
    """Smallest noise multiplier ``z`` with ``epsilon_fn(z) <= target_epsilon`` (to ``rtol``).

    ``epsilon_fn`` asks the accountant for the run's epsilon at ``delta`` (for record-level DP,
    the max over clients); it decreases with ``z``, so a bisection on ``log z`` finds the
    boundary. Searched in ``[MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER]``.
    """
    check_budget(target_epsilon, delta, num_examples)
    if epsilon_fn(MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ValueError(
            f"epsilon={target_epsilon} at delta={delta} is unreachable for this schedule even "
            f"with noise multiplier {MAX_NOISE_MULTIPLIER:g}: raise epsilon or delta, or train "
            "for fewer rounds/steps."
        )
    lo, hi = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    if epsilon_fn(lo) <= target_epsilon:
        return lo
    while hi / lo > 1.0 + rtol:  # invariant: epsilon_fn(lo) > target >= epsilon_fn(hi)
        mid = math.sqrt(lo * hi)
        if epsilon_fn(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
