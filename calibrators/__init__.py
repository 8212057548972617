"""Calibrators: quantizers, schemes, model instrumentation, range calibration, reconstruction."""
