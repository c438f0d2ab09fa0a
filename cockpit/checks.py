"""Cheap checks on tensors that run every tracked step."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["all_finite"]


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (no NaN, no ±inf).

    ``t.isfinite().all()`` writes a boolean tensor as large as ``t``: 130 µs for a
    100k-entry float32 gradient, a fifth of a plain step of a small MLP. A sum is
    NaN or infinite whenever an entry is, so the sums are checked first (10 µs);
    only when one of them is not finite (a non-finite entry, or finite entries whose
    sum overflows) are the entries themselves checked. Exact either way.

    Example:
        >>> import torch
        >>> all_finite([torch.ones(3), torch.zeros(2, 2)])
        True
        >>> all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
        False
        >>> all_finite([torch.tensor([3e38, 3e38])])  # the sum overflows, the entries do not
        True
    """
    ts = [t.detach() for t in tensors if t.numel()]
    if not ts:
        return True
    with torch.no_grad():
        try:
            sums = torch.stack([t.sum() for t in ts])  # one host sync for all
            if bool(sums.isfinite().all()):
                return True
        except RuntimeError:  # tensors on several devices: check each below
            pass
        return all(bool(t.isfinite().all()) for t in ts)
