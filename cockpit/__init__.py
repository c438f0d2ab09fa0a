"""Cockpit: live training diagnostics for PyTorch.

The engine gathers per-sample gradient statistics and curvature during the one
backward pass training already does; instruments turn them into diagnostics
that are logged to Parquet and shown in a live Dash dashboard.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
