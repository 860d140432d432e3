"""Differential privacy: DP-SGD, update-level DP, accounting and calibration (dp-accounting)."""
