"""Small numeric helpers shared by the instrument formulas (private).

Every formula evaluates in float64 whatever the dtype of its inputs: the engine may
gather in float32, but differences of nearly equal sums (variances from second
moments) lose most of their digits in single precision.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "RADICAND_RTOL",
    "as_scalar",
    "check_batch_size",
    "flat64",
    "nonneg_difference",
]

RADICAND_RTOL = 1e-4
"""Relative tolerance below which a negative variance estimate counts as rounding.

A variance computed as ``Σ x² − N x̄²`` is non-negative in exact arithmetic; when it
comes out negative by less than ``RADICAND_RTOL`` times the larger of the two terms,
the inputs were consistent and only rounding (float32 sums have relative errors of
roughly 1e-7 to 1e-5) moved it below zero, so it is clamped to zero. A more negative
value means the inputs do not belong together (a common cause: BackPACK-style
``1/N`` scaling left in the individual gradients), and the result is NaN with a
warning. Cockpit clamps nothing: its square roots of negative rounding residues are
NaN.
"""


def as_scalar(value: float | int | Tensor, name: str) -> float:
    """Return a scalar input as a Python float (float64).

    Args:
        value: A number or a one-element tensor.
        name: The argument's name, for the error message.

    Returns:
        The value as a float.

    Raises:
        ValueError: If ``value`` is a tensor with more than one element. Sums such
            as ``Σ_n (g_nᵀ g)²`` cannot in general be formed from per-layer parts
            (the square acts on the sum over layers), so the caller must reduce.

    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().to(torch.float64).item())
    return float(value)


def check_batch_size(n: int) -> int:
    """Validate a batch size.

    Args:
        n: Number of samples N.

    Returns:
        ``n`` as an int.

    Raises:
        ValueError: If ``n`` is not a positive integer.

    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"batch size must be a positive integer, got {n!r}")
    return int(n)


def flat64(values: Tensor | Sequence[Tensor]) -> Tensor:
    """Flatten a tensor, or concatenate a list of tensors, into one float64 vector.

    Args:
        values: One tensor (any shape) or a sequence of tensors, e.g. one per
            parameter tensor; they are flattened and concatenated in order.

    Returns:
        A detached float64 vector with all entries.

    Raises:
        ValueError: If an empty sequence is given.

    """
    if isinstance(values, Tensor):
        return values.detach().reshape(-1).to(torch.float64)
    parts = [v.detach().reshape(-1).to(torch.float64) for v in values]
    if not parts:
        raise ValueError("expected at least one tensor")
    device = parts[0].device
    return torch.cat([p.to(device) for p in parts])


def nonneg_difference(a: float, b: float, what: str) -> float:
    """Return ``a − b`` for a quantity that is ``≥ 0`` in exact arithmetic.

    Negative results within rounding (see :data:`RADICAND_RTOL`) are clamped to 0;
    larger negative results give NaN and a warning.

    Args:
        a: The larger term in exact arithmetic (e.g. ``Σ_n ‖g_n‖²``).
        b: The subtracted term (e.g. ``N ‖g‖²``).
        what: Name of the quantity, for the warning.

    Returns:
        ``max(a − b, 0)`` or NaN.

    """
    diff = a - b
    if math.isnan(diff) or diff >= 0.0:
        return diff
    scale = max(abs(a), abs(b))
    if -diff <= RADICAND_RTOL * scale:
        return 0.0
    warnings.warn(
        f"{what} is negative ({diff:.3e}, terms {a:.3e} and {b:.3e}) beyond rounding:"
        " the inputs are inconsistent (check the 1/N scaling of the individual"
        " gradients); returning NaN.",
        RuntimeWarning,
        stacklevel=3,
    )
    return math.nan
