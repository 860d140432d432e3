"""Differential privacy: DP-SGD (dp_sgd), accounting and calibration with dp-accounting."""
