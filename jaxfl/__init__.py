"""jaxfl: a vectorized federated-learning simulator for privacy-preserving medical imaging."""

__version__ = "0.1.0"
