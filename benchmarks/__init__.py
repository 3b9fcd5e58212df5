"""Benchmarks; run each as a module from the repo root (``python -m benchmarks.<name>``)."""
