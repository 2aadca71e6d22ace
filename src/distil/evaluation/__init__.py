"""Evaluation: metrics, latency and size measurement, reports."""
