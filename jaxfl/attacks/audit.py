"""Empirical differential-privacy audit: a lower bound on epsilon from jaxfl's own pipeline.

Jagielski et al. 2020 style. Two neighbouring worlds differ in one protected unit (a record for
``dp.mode='record'``, a client for ``local_update`` and ``user_level``); the pipeline's own
client function (:meth:`jaxfl.simulate.Simulator.trial_outputs`) or released aggregate
(:meth:`~jaxfl.simulate.Simulator.trial_releases`) runs many times in each, with fresh noise per
trial, and a distinguisher (the projection on the canary's noise-free update, which a white-box
attacker can compute) scores every observation. Any threshold's false-positive and
false-negative rates bound epsilon from below:

    eps >= max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR))

with Clopper-Pearson upper bounds on both rates. The threshold is chosen on one half of the
trials and the rates are bounded on the other, so the bound holds with confidence
``1 - alpha``. A correct DP mechanism keeps it below the accountant's epsilon; a broken one
(noise off while epsilon is still claimed) shows a bound above its claim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from scipy import stats

from jaxfl import factories
from jaxfl.privacy.plan import PrivacyPlan
from jaxfl.types import ClientArrays, FederatedData

AUDITED_MODES = ("record", "local_update", "user_level")


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` upper confidence bound on a rate seen ``k`` times in ``n``."""
    if n <= 0:
        raise ValueError("a Clopper-Pearson bound needs at least one trial")
    return 1.0 if k >= n else float(stats.beta.ppf(1.0 - alpha, k + 1, n - k))


def _epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """The epsilon that rates ``fpr`` and ``fnr`` of one test imply (0 when none)."""
    eps = 0.0
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if 1.0 - delta - a > 0:
            eps = max(eps, math.log((1.0 - delta - a) / max(b, 1e-300)))
    return eps


def _bounded_epsilon(canary: np.ndarray, null: np.ndarray, t: float, delta, alpha) -> tuple:
    """``(epsilon, FPR upper bound, FNR upper bound)`` of "score >= t means canary"."""
    fpr = clopper_pearson_upper(int(np.sum(null >= t)), null.size, alpha / 2)
    fnr = clopper_pearson_upper(int(np.sum(canary < t)), canary.size, alpha / 2)
    return _epsilon_from_rates(fpr, fnr, delta), fpr, fnr


class EpsilonBound(NamedTuple):
    """An empirical epsilon lower bound and the test it came from."""

    epsilon: float
    threshold: float
    fpr_upper: float
    fnr_upper: float
    trials: int  # per world, both halves


def epsilon_lower_bound(
    canary_scores: np.ndarray, null_scores: np.ndarray, delta: float, alpha: float = 0.05
) -> EpsilonBound:
    """A ``1 - alpha`` lower bound on epsilon from distinguisher scores ``[T]`` of the canary
    world and the null world (higher = more canary-like).

    The first half of each world's trials picks the threshold (the best bounded epsilon over
    their score quantiles); the second half bounds its rates, so selection cannot inflate it.
    """
    canary, null = np.asarray(canary_scores, np.float64), np.asarray(null_scores, np.float64)
    if min(canary.size, null.size) < 4:
        raise ValueError("an epsilon audit needs at least 4 trials per world")
    c1, c2 = np.array_split(canary, 2)
    n1, n2 = np.array_split(null, 2)
    candidates = np.unique(np.quantile(np.concatenate([c1, n1]), np.linspace(0, 1, 257)))
    picked = max(candidates, key=lambda t: _bounded_epsilon(c1, n1, t, delta, alpha)[0])
    eps, fpr, fnr = _bounded_epsilon(c2, n2, float(picked), delta, alpha)
    return EpsilonBound(eps, float(picked), fpr, fnr, int(min(canary.size, null.size)))


def without_noise(privacy: PrivacyPlan) -> PrivacyPlan:
    """``privacy`` with its noise switched off and everything else (clipping, accounting) kept:
    what a white-box auditor uses for the canary's direction, and the broken-DP control."""
    if privacy.update_dp is not None:
        privacy = privacy._replace(update_dp=privacy.update_dp._replace(noise_std=0.0))
    if privacy.dp_sgd is not None:
        privacy = privacy._replace(dp_sgd=privacy.dp_sgd._replace(noise_multiplier=0.0))
    return privacy


def _only_client(train: ClientArrays, client: int) -> ClientArrays:
    """``train`` cut to ``client`` alone (a leading axis of 1)."""
    return jax.tree.map(lambda a: np.asarray(a)[client : client + 1], train)


def _without_last_record(train: ClientArrays, client: int) -> ClientArrays:
    """``train`` with ``client``'s last real example masked out (its record-level neighbour)."""
    counts = np.array(train.counts)
    mask = np.array(train.mask)
    mask[client, counts[client] - 1] = 0.0
    counts[client] -= 1
    return train._replace(mask=mask, counts=counts)


def _with_flipped_label(
    train: ClientArrays, client: int, num_classes: int, key: str = "label"
) -> ClientArrays:
    """``train`` with ``client``'s last real example relabelled (its ``key`` target: a label,
    or every labelled pixel of a mask, moved to the next class): a mislabelled record, whose
    large gradient is the strongest canary an honest-looking client can hold."""
    examples = dict(train.examples)
    labels = np.array(examples[key])
    last = int(np.asarray(train.counts)[client]) - 1
    target = labels[client, last]
    labels[client, last] = np.where(target >= 0, (target + 1) % num_classes, target)
    examples[key] = labels
    return train._replace(examples=examples)


def _observe(simulation, mode: str, rounds: np.ndarray, valid: np.ndarray, train, chunk: int):
    """The audited observation ``[R, D]`` of each round from the initial model: client 0's
    update as sent (record, local_update) or the released aggregate (user_level), ``chunk``
    rounds per call (one compiled shape)."""
    sim = simulation.runner
    state = sim.init(simulation.params)
    out = []
    for start in range(0, len(rounds), chunk):
        part = rounds[start : start + chunk]
        padded = np.concatenate([part, np.full(chunk - len(part), part[-1])])
        if mode == "user_level":
            obs = sim.trial_releases(state, padded, valid, train)
        else:
            obs = sim.trial_outputs(state, padded, valid, train)[0][:, 0]
        out.append(np.asarray(obs)[: len(part)])
    return np.concatenate(out)


def audit_dp(
    config: ml_collections.ConfigDict,
    fed: FederatedData,
    *,
    trials: int = 1000,
    broken: bool = False,
    alpha: float = 0.05,
    chunk: int = 250,
) -> dict[str, float]:
    """Audit one round of ``config``'s DP mode on ``fed`` against the accountant.

    The protected unit is client 0's last record (``record``: present, and relabelled, vs
    absent) or client 0 itself (``local_update``: its data vs none, what it sends;
    ``user_level``: taking part vs not, the released aggregate). ``trials`` rounds run in each
    world from the initial model. ``broken``: the noise is switched off while the accountant
    still claims its epsilon (a deliberately broken config). Returns the accountant's
    one-round ``epsilon_claimed`` for client 0, the ``epsilon_empirical`` lower bound and the
    test behind it.
    """
    mode = config.dp.mode
    if mode not in AUDITED_MODES:
        raise ValueError(f"dp.mode={mode!r} has no epsilon to audit; use one of {AUDITED_MODES}")
    honest = factories.build_simulation(config, fed)
    plan = honest.privacy
    claimed = float(np.asarray(plan.epsilons_for([plan.noise_multiplier]))[0])
    quiet = factories.build_simulation(config, fed, privacy=without_noise(plan))
    k = fed.train.num_clients
    everyone = np.ones(k, bool)
    if mode == "record":
        # What client 0 sends depends on its data alone: run it alone.
        target = honest.task.target_key
        canary = _with_flipped_label(_only_client(fed.train, 0), 0, fed.num_classes, target)
        worlds = [(canary, everyone[:1]), (_without_last_record(canary, 0), everyone[:1])]
    elif mode == "local_update":
        alone = _only_client(fed.train, 0)
        worlds = [(alone, everyone[:1]), (alone, ~everyone[:1])]
    else:
        worlds = [(fed.train, everyone), (fed.train, np.arange(k) != 0)]
    # The white-box auditor's direction: the canary world's noise-free observation minus the
    # null world's (means over a chunk of rounds absorb sampling and shuffling).
    means = [_observe(quiet, mode, np.arange(chunk), v, t, chunk).mean(0) for t, v in worlds]
    direction = means[0] - means[1]
    norm = float(np.linalg.norm(direction))
    if norm == 0.0:
        raise ValueError("the two worlds send the same noise-free update: nothing to audit")
    direction /= norm
    sim = quiet if broken else honest
    scores = [
        _observe(sim, mode, chunk + i * trials + np.arange(trials), v, t, chunk) @ direction
        for i, (t, v) in enumerate(worlds)
    ]
    bound = epsilon_lower_bound(scores[0], scores[1], config.dp.delta, alpha)
    return {
        "mode": mode,
        "broken": broken,
        "noise_multiplier": 0.0 if broken else float(honest.privacy.noise_multiplier),
        "epsilon_claimed": claimed,
        "epsilon_empirical": bound.epsilon,
        "delta": float(config.dp.delta),
        "confidence": 1.0 - alpha,
        "trials": bound.trials,
        "fpr_upper": bound.fpr_upper,
        "fnr_upper": bound.fnr_upper,
        "canary_sensitivity": norm,
    }
