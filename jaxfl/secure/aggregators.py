"""Host-side protect-and-aggregate step between the jitted client step and the server update.

Input: the round's client updates flattened to ``updates [K, D]`` float32 and their weights
``[K]``; output: the weighted mean of the surviving clients' updates (numpy in, numpy out,
never inside jit).

Weighting is the same for every protocol (Flower SecAgg+'s ``max_weight``): client ``i``
multiplies its update by ``r_i = w_i / max_weight`` and appends ``r_i`` as one extra
coordinate; the protocol sums these ``[D + 1]`` vectors over the survivors; the server divides
the first ``D`` coordinates of the sum by the last. Dropped clients add to neither.
``max_weight`` is a public bound (e.g. the largest client dataset); ``None`` uses the round's
largest weight.
"""

from __future__ import annotations

import abc
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from jaxfl.secure.secagg import SecAggConfig, secagg_sum, validate_config

if TYPE_CHECKING:
    from jaxfl.secure.ckks import CKKSParams

# The CKKS classes import jaxfl.secure.ckks (and so tenseal) only when constructed, keeping
# `import jaxfl.secure` light for runs that never use CKKS.

AGGREGATORS = ("plain", "secagg", "ckks", "ckks_ring")


class AggregateResult(NamedTuple):
    """``mean``: ``[D]`` float32 weighted mean over the survivors; ``survivors``: their row
    indices; ``stats``: timings (``client_s`` mean seconds per client, ``server_s``,
    ``round_s`` wall seconds of the whole step), traffic (``bytes_per_client``,
    ``plain_bytes_per_client``) and protocol counters."""

    mean: np.ndarray
    survivors: np.ndarray
    stats: dict[str, float]


class HostAggregator(abc.ABC):
    """A secure-aggregation protocol run on the host once per round."""

    name: str

    @abc.abstractmethod
    def aggregate(
        self, updates: np.ndarray, weights: np.ndarray, round_idx: int
    ) -> AggregateResult:
        """Weighted mean of ``updates [K, D]`` with ``weights [K]`` over the surviving clients."""


def weighted_inputs(
    updates: np.ndarray, weights: np.ndarray, max_weight: float | None
) -> np.ndarray:
    """``[K, D + 1]`` float64 protocol inputs: each row ``r_i * u_i`` followed by ``r_i``, with
    ``r_i = w_i / max_weight`` (``max_weight`` ``None``: the largest weight)."""
    u = np.asarray(updates)
    w = np.asarray(weights, np.float64)
    if u.ndim != 2 or w.shape != (u.shape[0],):
        raise ValueError(f"need updates [K, D] and weights [K], got {u.shape} and {w.shape}")
    if not np.isfinite(u).all():
        raise ValueError("updates contain NaN or infinite values")
    if not (np.isfinite(w).all() and (w >= 0).all() and w.max() > 0):
        raise ValueError("weights must be finite, non-negative and not all zero")
    bound = w.max() if max_weight is None else float(max_weight)
    if w.max() > bound:
        raise ValueError(
            f"a client weight {w.max():g} exceeds max_weight={bound:g}; raise max_weight to at "
            "least the largest client weight"
        )
    ratio = w / bound
    out = np.empty((u.shape[0], u.shape[1] + 1))
    np.multiply(u, ratio[:, None], out=out[:, :-1])
    out[:, -1] = ratio
    return out


def _check_max_weight(max_weight: float | None) -> None:
    if max_weight is not None and not max_weight > 0:
        raise ValueError(f"max_weight must be positive or None, got {max_weight}")


def mean_from_sum(total: np.ndarray) -> np.ndarray:
    """``[D]`` float32 weighted mean from a ``[D + 1]`` protocol sum (last entry: sum of r_i)."""
    if not total[-1] > 0:
        raise ValueError(
            f"the surviving clients' weight ratios sum to {total[-1]:g}; no weighted mean exists"
        )
    return (total[:-1] / total[-1]).astype(np.float32)


class SecAggAggregator(HostAggregator):
    """SecAgg+ (``jaxfl.secure.secagg``); the mean is exact up to quantization."""

    name = "secagg"

    def __init__(self, config: SecAggConfig, *, seed: int, secure_randomness: bool = False) -> None:
        validate_config(config)
        self.config, self.seed, self.secure_randomness = config, seed, secure_randomness

    def aggregate(
        self, updates: np.ndarray, weights: np.ndarray, round_idx: int
    ) -> AggregateResult:
        start = time.perf_counter()
        inputs = weighted_inputs(updates, weights, self.config.max_weight)
        total, survivors, stats = secagg_sum(
            inputs,
            self.config,
            seed=self.seed,
            round_idx=round_idx,
            secure_randomness=self.secure_randomness,
        )
        mean = mean_from_sum(total)
        stats["plain_bytes_per_client"] = 4.0 * mean.size
        stats["round_s"] = time.perf_counter() - start
        return AggregateResult(mean, survivors, stats)


class CKKSAggregator(HostAggregator):
    """CKKS sum by the server (``jaxfl.secure.ckks.ckks_sum``); every client survives.

    The clients' shared key is generated once, at construction."""

    name = "ckks"

    def __init__(
        self, params: CKKSParams | None = None, *, max_weight: float | None = None
    ) -> None:
        from jaxfl.secure.ckks import CKKSKeyHolder

        _check_max_weight(max_weight)
        self.key_holder = CKKSKeyHolder(params)
        self.max_weight = max_weight

    def aggregate(
        self, updates: np.ndarray, weights: np.ndarray, round_idx: int
    ) -> AggregateResult:
        from jaxfl.secure.ckks import ckks_sum

        start = time.perf_counter()
        total, stats = ckks_sum(weighted_inputs(updates, weights, self.max_weight), self.key_holder)
        mean = mean_from_sum(total)
        stats["plain_bytes_per_client"] = 4.0 * mean.size
        stats["round_s"] = time.perf_counter() - start
        return AggregateResult(mean, np.arange(len(weights)), stats)


class CKKSRingAggregator(HostAggregator):
    """PPPML-HMI cyclic CKKS aggregation (``jaxfl.secure.ckks.ckks_ring_sum``); every client
    survives. The clients' shared key is generated once, at construction."""

    name = "ckks_ring"

    def __init__(
        self,
        params: CKKSParams | None = None,
        *,
        sigma: float = 1e4,
        max_weight: float | None = None,
    ) -> None:
        from jaxfl.secure.ckks import CKKSKeyHolder

        if not sigma > 0:
            raise ValueError(f"the ring mask sigma must be positive, got {sigma}")
        _check_max_weight(max_weight)
        self.key_holder = CKKSKeyHolder(params)
        self.sigma, self.max_weight = sigma, max_weight

    def aggregate(
        self, updates: np.ndarray, weights: np.ndarray, round_idx: int
    ) -> AggregateResult:
        from jaxfl.secure.ckks import ckks_ring_sum

        start = time.perf_counter()
        total, stats = ckks_ring_sum(
            weighted_inputs(updates, weights, self.max_weight),
            self.key_holder, round_idx=round_idx, sigma=self.sigma,
        )  # fmt: skip
        mean = mean_from_sum(total)
        stats["plain_bytes_per_client"] = 4.0 * mean.size
        stats["round_s"] = time.perf_counter() - start
        return AggregateResult(mean, np.arange(len(weights)), stats)


def _split_options(
    name: str, options: dict[str, Any], fields: tuple[str, ...], extra: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into those named in ``fields`` and those in ``extra``."""
    unknown = sorted(set(options) - set(fields) - set(extra))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for aggregator {name!r}; valid: {sorted(fields + extra)}"
        )
    own = {k: v for k, v in options.items() if k in fields}
    return own, {k: v for k, v in options.items() if k in extra}


def make_host_aggregator(name: str, *, seed: int, **options: Any) -> HostAggregator | None:
    """The host aggregator called ``name`` (one of ``AGGREGATORS``), or ``None`` for ``"plain"``
    (the in-jit weighted mean). ``options`` are ``SecAggConfig`` fields for ``"secagg"``;
    ``CKKSParams`` fields plus ``max_weight`` (and ``sigma`` for the ring) for the CKKS modes.
    Sequences may be lists (config files). ``seed`` drives SecAgg+'s non-cryptographic draws
    (graph, simulated dropouts, and rounding unless ``secure_randomness``); the CKKS modes use
    none (the ring's mask comes from the OS CSPRNG)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {AGGREGATORS}")
    if name == "plain":
        if options:
            raise ValueError(f"the plain aggregator takes no options, got {sorted(options)}")
        return None
    if name == "secagg":
        config, extra = _split_options(name, options, SecAggConfig._fields, ("secure_randomness",))
        if "dropout_probs" in config:
            config["dropout_probs"] = tuple(config["dropout_probs"])
        return SecAggAggregator(SecAggConfig(**config), seed=seed, **extra)
    from jaxfl.secure.ckks import CKKSParams

    extra = ("max_weight", "sigma") if name == "ckks_ring" else ("max_weight",)
    fields, rest = _split_options(name, options, CKKSParams._fields, extra)
    if "coeff_mod_bit_sizes" in fields:
        fields["coeff_mod_bit_sizes"] = tuple(fields["coeff_mod_bit_sizes"])
    if name == "ckks":
        return CKKSAggregator(CKKSParams(**fields), **rest)
    return CKKSRingAggregator(CKKSParams(**fields), **rest)
