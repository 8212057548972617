"""Validation: real-data accuracy, label-free fidelity, latency, gates and reports."""
