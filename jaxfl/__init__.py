"""jaxfl: a vectorized federated-learning simulator for privacy-preserving medical imaging."""

from jaxfl.runtime import (
    configure_collective_timeouts,
    configure_cpu_convolutions,
    configure_cpu_devices,
)

__version__ = "0.1.0"

configure_collective_timeouts()
configure_cpu_convolutions()
configure_cpu_devices()
