"""Cockpit: live training diagnostics for PyTorch.

The engine gathers per-sample gradient statistics and curvature during the one
backward pass training already does; instruments turn them into diagnostics
that are logged to Parquet and shown in a live Dash dashboard.
"""

__version__ = "0.1.0"

from cockpit import quantities as Q  # noqa: E402
from cockpit import schedules  # noqa: E402
from cockpit.cockpit import Cockpit, NonFiniteError  # noqa: E402
from cockpit.engine import Engine  # noqa: E402
from cockpit.layers import UnsupportedModuleError, register_layer  # noqa: E402

__all__ = [
    "__version__",
    "Cockpit",
    "Engine",
    "NonFiniteError",
    "Q",
    "UnsupportedModuleError",
    "register_layer",
    "schedules",
]
