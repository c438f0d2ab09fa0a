"""Takeuchi information criterion approximations (Thomas et al. 2020; Cockpit).

TIC ≈ ``tr(H⁻¹ C)`` with the curvature H and the uncentered gradient second moment
``C = (1/N) Σ_n g_n g_nᵀ`` of the *unscaled* individual gradients. Two cheap forms:

- ``tic_diag``: diagonal H and C, ``Σ_j m2_j / (h_j + ε)`` with
  ``m2_j = (1/N) Σ_n g_nj²``;
- ``tic_trace``: traces only, ``((1/N) Σ_n ‖g_n‖²) / (Σ_j h_j + ε)``.

Agreement with Cockpit v1.0.2 (``cockpit/quantities/tic.py``, ``TICDiag._compute``:
``(batch_size · sum_grad_squared / (curvature + ε)).sum()`` and ``TICTrace._compute``:
``batch_size · sum_grad_squared.sum() / (curvature.sum() + ε)``, with BackPACK's
``1/N``-scaled ``sum_grad_squared``): same formulas and ε placement (ε = 1e-7). Cockpit
does not warn about non-positive curvature (its default, the diagonal Hessian, can
have negative entries, which make terms negative or blow them up); these functions
warn. The curvature must be that of the mean loss (Cockpit's BackPACK diagonals are);
under ``reduction="sum"`` divide the summed curvature by N.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor

from instruments._numerics import as_scalar, check_batch_size, flat64

__all__ = ["tic_diag", "tic_trace"]


def _warn_nonpositive(count: int, total: int, stacklevel: int = 3) -> None:
    warnings.warn(
        f"TIC: the curvature has {count} non-positive entr{'y' if count == 1 else 'ies'}"
        f" out of {total}; the criterion assumes a positive definite curvature.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def tic_diag(
    second_moment: Tensor | Sequence[Tensor],
    n: int,
    curvature_diag: Tensor | Sequence[Tensor],
    eps: float = 1e-7,
) -> float:
    """TIC with diagonal curvature and diagonal second moment.

    Args:
        second_moment: ``Σ_n g_n²`` per coordinate (a sum, not yet divided by N),
            one tensor or one per parameter tensor.
        n: Batch size N.
        curvature_diag: Diagonal ``h`` of the mean loss's curvature (Hessian, exact
            or Monte-Carlo GGN), laid out like ``second_moment``.
        eps: Stabilizer added to each ``h_j`` (Cockpit's default 1e-7).

    Returns:
        ``Σ_j ((1/N) Σ_n g_nj²) / (h_j + ε)``.

    Raises:
        ValueError: If the two inputs hold different numbers of entries.

    """
    n = check_batch_size(n)
    m2 = flat64(second_moment) / n
    h = flat64(curvature_diag)
    if m2.numel() != h.numel():
        raise ValueError(
            f"second_moment has {m2.numel()} entries but curvature_diag has {h.numel()}"
        )
    nonpositive = int((h <= 0).sum())
    if nonpositive:
        _warn_nonpositive(nonpositive, h.numel())
    return float((m2 / (h + eps)).sum())


def tic_trace(
    sum_l2: float | Tensor,
    n: int,
    curvature_trace: float | Tensor | Sequence[Tensor],
    eps: float = 1e-7,
) -> float:
    """TIC from the traces of the second moment and of the curvature.

    Args:
        sum_l2: ``Σ_n ‖g_n‖²`` over the unscaled individual gradients (scalar).
        n: Batch size N.
        curvature_trace: The trace ``Σ_j h_j`` of the mean loss's curvature (a
            number or one-element tensor), or the diagonal ``h`` itself (a tensor
            with several entries or a list of tensors), which is then summed and
            checked entry by entry.
        eps: Stabilizer added to the trace (Cockpit's default 1e-7).

    Returns:
        ``((1/N) Σ_n ‖g_n‖²) / (Σ_j h_j + ε)``.

    """
    n = check_batch_size(n)
    sum_l2 = as_scalar(sum_l2, "sum_l2")
    if isinstance(curvature_trace, (int, float)) or (
        isinstance(curvature_trace, Tensor) and curvature_trace.numel() == 1
    ):
        trace = as_scalar(curvature_trace, "curvature_trace")
        if trace <= 0.0:
            warnings.warn(
                f"TIC: the curvature trace is non-positive ({trace!r}); the criterion"
                " assumes a positive definite curvature.",
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        h = flat64(curvature_trace)
        nonpositive = int((h <= 0).sum())
        if nonpositive:
            _warn_nonpositive(nonpositive, h.numel())
        trace = float(h.sum())
    return (sum_l2 / n) / (trace + eps)
