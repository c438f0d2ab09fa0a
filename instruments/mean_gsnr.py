"""Mean gradient signal-to-noise ratio (Liu et al. 2020; Cockpit definition).

``GSNR_j = g_j² / (m2_j − g_j² + ε)`` with the mean gradient ``g = (1/N) Σ_n g_n``
and the per-coordinate second moment ``m2_j = (1/N) Σ_n g_nj²`` of the *unscaled*
individual gradients, so the noise term is the biased (divide-by-N) variance. The
instrument reports the mean over all D coordinates of all tracked tensors.

Agreement with Cockpit v1.0.2 (``cockpit/quantities/mean_gsnr.py``, ``_compute_gsnr``:
``grad² / (batch_size · sum_grad_squared − grad² + ε)`` with BackPACK's ``1/N``-scaled
``sum_grad_squared = (1/N²) Σ_n g_n²``, then ``.mean()`` over the concatenated
vector): same formula and ε placement; the biased variance is not clamped (neither is
Cockpit's). Deliberate difference: for ``N = 1`` the variance is identically 0 and
Cockpit reports ``g²/ε``, a number about ε only; here it is NaN.

Reduction: under ``reduction="sum"`` pass ``g = ∇L / N``; ``second_moment`` is
``Σ_n (∇l_n)²`` either way. GSNR is not scale-free (ε is absolute), so ``g_n`` must
be the gradients of the individual losses ``l_n`` as MATH.md defines them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from cockpit.quantities import SecondMoment
from instruments._numerics import check_batch_size, flat64
from instruments.base import (
    Instrument,
    PanelSpec,
    Record,
    StepContext,
    register_instrument,
    second_moment_rows,
)

__all__ = ["MeanGSNR", "mean_gsnr"]


def mean_gsnr(
    second_moment: Tensor | Sequence[Tensor],
    grad: Tensor | Sequence[Tensor],
    n: int,
    eps: float = 1e-5,
) -> float:
    """Mean GSNR over all parameter coordinates.

    Args:
        second_moment: ``Σ_n g_n²`` per coordinate (a sum, not yet divided by N),
            one tensor or a list with one tensor per parameter tensor.
        grad: The mean gradient ``g``, laid out like ``second_moment``.
        n: Batch size N.
        eps: Stabilizer added to the variance (Cockpit's default 1e-5).

    Returns:
        ``mean_j g_j² / ((1/N) Σ_n g_nj² − g_j² + ε)``; NaN for ``N = 1``.

    Raises:
        ValueError: If the two inputs hold different numbers of entries.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> g = torch.randn(16, 5, dtype=torch.float64) + 1.0  # [N, D]: individual gradients
        >>> from instruments.mean_gsnr import mean_gsnr
        >>> mean = g.mean(0)  # [D]
        >>> gsnr = mean_gsnr((g**2).sum(0), mean, 16)
        >>> ref = (mean**2 / (g.var(0, unbiased=False) + 1e-5)).mean()
        >>> abs(gsnr - float(ref)) < 1e-12
        True

    """
    n = check_batch_size(n)
    m2 = flat64(second_moment) / n
    g = flat64(grad)
    if m2.numel() != g.numel():
        raise ValueError(f"second_moment has {m2.numel()} entries but grad has {g.numel()}")
    if n < 2:
        return math.nan
    g_sq = g.square()
    return float((g_sq / (m2 - g_sq + eps)).mean())


@register_instrument
class MeanGSNR(Instrument):
    """Mean gradient signal-to-noise ratio (Liu et al. 2020), model-wide and per tensor.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments.mean_gsnr import mean_gsnr
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["mean_gsnr"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> g = 2 * (model(x) - y).detach() * torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: g_n
        >>> ref = mean_gsnr((g**2).sum(0), g.mean(0), 32)
        >>> abs(latest["mean_gsnr"] - ref) < 1e-9
        True
    """

    name = "mean_gsnr"
    requires = frozenset({SecondMoment()})
    cost = "first-order"
    panel = PanelSpec(
        "line",
        "gradients",
        "Mean GSNR",
        y_log=True,
        description="How consistent are the individual gradients' signs and sizes?",
    )

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        return second_moment_rows(ctx, self.name, mean_gsnr)
