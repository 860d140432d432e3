"""Host-side secure aggregation: SecAgg+ masking and CKKS homomorphic encryption of client updates.

``make_host_aggregator`` builds the per-round protect-and-aggregate step (numpy in, numpy out).
CKKS lives in ``jaxfl.secure.ckks``, imported on first use (it pulls in tenseal).
"""

from jaxfl.secure.aggregators import (
    AGGREGATORS,
    AggregateResult,
    CKKSAggregator,
    CKKSRingAggregator,
    HostAggregator,
    SecAggAggregator,
    make_host_aggregator,
    mean_from_sum,
    weighted_inputs,
)
from jaxfl.secure.quantize import dequantize, quantization_rng, quantization_step, quantize
from jaxfl.secure.secagg import (
    SecAggConfig,
    SecAggError,
    secagg_sum,
    secagg_sum_quantized,
    shamir_reconstruct,
    shamir_split,
)

__all__ = [
    "AGGREGATORS",
    "AggregateResult",
    "CKKSAggregator",
    "CKKSRingAggregator",
    "HostAggregator",
    "SecAggAggregator",
    "SecAggConfig",
    "SecAggError",
    "dequantize",
    "make_host_aggregator",
    "mean_from_sum",
    "quantization_rng",
    "quantization_step",
    "quantize",
    "secagg_sum",
    "secagg_sum_quantized",
    "shamir_reconstruct",
    "shamir_split",
    "weighted_inputs",
]
