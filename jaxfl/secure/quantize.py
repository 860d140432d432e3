"""Stochastic fixed-point quantization of client vectors for secure aggregation.

Flower's SecAgg+ encoding: clip every coordinate to ``[-clip_range, clip_range]``, map it
affinely onto ``[0, 2^bits]`` and round stochastically (up with probability equal to the
fractional part), so the integer is an unbiased estimate of the scaled value and the rounding
error of one coordinate is below one quantization step ``2 clip_range / 2^bits``. Summing the
integers of ``n`` clients and dequantizing with ``n`` gives the sum of the clipped vectors.
"""

from __future__ import annotations

import numpy as np

# Stream tag that keeps quantization draws independent of the other per-round streams that
# share (seed, round) in jaxfl.secure.
_QUANTIZE_STREAM = 0x5154


def quantization_rng(seed: int, round_idx: int, client: int) -> np.random.Generator:
    """The Generator client ``client`` uses for stochastic rounding in round ``round_idx``.

    Public so that a test (or an auditor) can recompute a client's quantized vector exactly.
    """
    return np.random.default_rng([seed, round_idx, client, _QUANTIZE_STREAM])


def quantization_step(clip_range: float, bits: int) -> float:
    """Width of one integer step in the original units: ``2 clip_range / 2^bits``."""
    return 2.0 * clip_range / 2.0**bits


def quantize(x: np.ndarray, clip_range: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """``[D]`` floats -> ``[D]`` int64 in ``[0, 2^bits]``: clip, shift, scale, round stochastically.

    Works in float64 whatever the input dtype: at 22 bits a float32 would keep only ~2
    fractional bits and bias the rounding.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    scaled = (np.clip(np.asarray(x, np.float64), -clip_range, clip_range) + clip_range) * (
        1.0 / quantization_step(clip_range, bits)
    )
    low = np.floor(scaled)
    return low.astype(np.int64) + (rng.random(scaled.shape) < scaled - low)


def dequantize(total: np.ndarray, clip_range: float, bits: int, num_summed: int) -> np.ndarray:
    """Map the integer sum of ``num_summed`` quantized ``[D]`` vectors back to the float64 sum
    of the (clipped) originals: undo the scale and remove the ``clip_range`` shift once per
    summand."""
    return np.asarray(total, np.float64) * quantization_step(clip_range, bits) - (
        num_summed * clip_range
    )
