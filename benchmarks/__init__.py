"""Benchmarks of cockpit-live's engine against a plain training step and reference packages.

Run ``python -m benchmarks [engine|reference|all] [--quick] [--device cpu|cuda]``;
see ``benchmarks/README.md``. This package must stay importable without our
``cockpit`` package (its workload and harness modules also run in ``.bench-venv``).
"""
