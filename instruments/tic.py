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

from cockpit.quantities import BatchL2, SecondMoment
from instruments._numerics import as_scalar, check_batch_size, flat64
from instruments.base import (
    Instrument,
    PanelSpec,
    Record,
    Scalar,
    StepContext,
    register_instrument,
)
from instruments.hess_trace import curvature_quantity

__all__ = ["TICDiag", "TICTrace", "tic_diag", "tic_trace"]


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

    Example:
        >>> import torch
        >>> from instruments.tic import tic_diag
        >>> _ = torch.manual_seed(0)
        >>> g = torch.randn(16, 5, dtype=torch.float64)  # [N, D]: individual gradients
        >>> h = torch.rand(5, dtype=torch.float64) + 0.5  # [D]: positive curvature diagonal
        >>> tic = tic_diag((g**2).sum(0), 16, h)
        >>> abs(tic - float(((g**2).mean(0) / (h + 1e-7)).sum())) < 1e-12
        True

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

    Example:
        >>> import torch
        >>> from instruments.tic import tic_trace
        >>> _ = torch.manual_seed(0)
        >>> g = torch.randn(16, 5, dtype=torch.float64)  # [N, D]
        >>> h = torch.rand(5, dtype=torch.float64) + 0.5  # [D]
        >>> tic = tic_trace((g**2).sum(), 16, h)  # the diagonal, or its sum h.sum()
        >>> abs(tic - float((g**2).sum(1).mean() / (h.sum() + 1e-7))) < 1e-12
        True

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


class _TIC(Instrument):
    cost = "curvature"

    def __init__(self, schedule=None, curvature: str = "hessian") -> None:
        super().__init__(schedule)
        self.curvature = curvature
        self.quantity = curvature_quantity(curvature)
        self.requires = frozenset({self.quantity, *self.extra})

    def _once(self, step: int, fn, *args) -> float:
        """Call ``fn``; its non-positive-curvature warning is reported once per instrument.

        Dead ReLUs leave zeros in the curvature diagonal on almost every step; one
        warning per step and tensor would drown everything else.
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn(*args)
        for w in caught:
            if str(w.message).startswith("TIC:"):
                if getattr(self, "_warned", False):
                    continue
                self._warned = True
                msg = f"{w.message} (step {step}; {self.name} reports this once)"
                warnings.warn(msg, w.category, stacklevel=4)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return value

    def _curvature(self, ctx: StepContext) -> dict:
        """Diagonal curvature of the *mean* loss (the batch loss's divided by N for "sum")."""
        assert ctx.gathered is not None
        diag = ctx.gathered[self.quantity]
        if ctx.reduction == "sum":
            return {k: v / ctx.batch_size for k, v in diag.items()}
        return diag

    def config(self) -> dict:  # noqa: D102
        return {**super().config(), "curvature": self.curvature}


@register_instrument
class TICDiag(_TIC):
    """Takeuchi information criterion with diagonal curvature; see :func:`tic_diag`.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments.tic import tic_diag
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["tic_diag"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> g = 2 * (model(x) - y).detach() * torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: g_n
        >>> a = torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: the Hessian is (2/N) aᵀa
        >>> h = 2 / 32 * a.pow(2).sum(0)  # [D]: exact Hessian diagonal of the mean loss
        >>> abs(latest["tic_diag"] - tic_diag((g**2).sum(0), 32, h)) < 1e-9
        True
    """

    name = "tic_diag"
    extra = (SecondMoment(),)
    panel = PanelSpec("line", "curvature", "TIC (diagonal)", y_log=True)

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        h = self._curvature(ctx)
        sm = ctx.gathered[SecondMoment()]
        keys = list(h)
        n = ctx.batch_size
        rows: list[Record] = [
            Scalar(
                ctx.step,
                self.name,
                self.name,
                "all",
                self._once(ctx.step, tic_diag, [sm[k] for k in keys], n, [h[k] for k in keys]),
            )
        ]
        rows += [
            Scalar(
                ctx.step, self.name, self.name, k, self._once(ctx.step, tic_diag, sm[k], n, h[k])
            )
            for k in keys
        ]
        return rows


@register_instrument
class TICTrace(_TIC):
    """Takeuchi information criterion from traces; see :func:`tic_trace`.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments.tic import tic_trace
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["tic_trace"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> g = 2 * (model(x) - y).detach() * torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: g_n
        >>> a = torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: the Hessian is (2/N) aᵀa
        >>> trace = 2 / 32 * a.pow(2).sum()  # exact Hessian trace of the mean loss
        >>> abs(latest["tic_trace"] - tic_trace((g**2).sum(), 32, trace)) < 1e-9
        True
    """

    name = "tic_trace"
    extra = (BatchL2(),)
    panel = PanelSpec("line", "curvature", "TIC (trace)", y_log=True)

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        h = self._curvature(ctx)
        l2 = ctx.gathered[BatchL2()]
        n = ctx.batch_size
        total = sum(float(v.double().sum()) for v in h.values())
        rows: list[Record] = [
            Scalar(
                ctx.step,
                self.name,
                self.name,
                "all",
                self._once(
                    ctx.step, tic_trace, float(ctx.gathered.total(BatchL2()).sum()), n, total
                ),
            )
        ]
        rows += [
            Scalar(
                ctx.step,
                self.name,
                self.name,
                k,
                self._once(ctx.step, tic_trace, float(l2[k].sum()), n, float(h[k].double().sum())),
            )
            for k in h
        ]
        return rows
