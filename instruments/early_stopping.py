"""Evidence-based early-stopping criterion (Mahsereci et al. 2017; Cockpit definition).

With the unbiased per-coordinate variance ``s_j² = (Σ_n g_nj² − N g_j²) / (N − 1)``
of the *unscaled* individual gradients and the mean gradient ``g``:

``EB = 1 − N · (1/D) Σ_j g_j² / (s_j² + ε)``   (left-hand side of Eq. 7).

``EB > 0`` is the stop signal: the gradient is no longer distinguishable from noise.

Agreement with Cockpit v1.0.2 (``cockpit/quantities/early_stopping.py``,
``_compute``): same formula, ε added to the variance, unbiased variance, mean over the
concatenated coordinates, variance not clamped. Cockpit's quantity raises unless the
optimizer is zero-momentum SGD; that check belongs to the instrument wrapping this
function, not to the formula. For ``N = 1`` Cockpit divides by ``N − 1 = 0`` (NaN or
inf entries); here the result is NaN.

Reduction: under ``reduction="sum"`` pass ``g = ∇L / N``.
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

__all__ = ["EarlyStopping", "early_stopping"]


def early_stopping(
    second_moment: Tensor | Sequence[Tensor],
    grad: Tensor | Sequence[Tensor],
    n: int,
    eps: float = 1e-5,
) -> float:
    """EB criterion; training should stop when it exceeds 0.

    Args:
        second_moment: ``Σ_n g_n²`` per coordinate, one tensor or one per parameter.
        grad: The mean gradient ``g``, laid out like ``second_moment``.
        n: Batch size N.
        eps: Stabilizer added to the variance (Cockpit's default 1e-5).

    Returns:
        ``1 − N mean_j g_j² / (s_j² + ε)``; NaN for ``N = 1``.

    Raises:
        ValueError: If the two inputs hold different numbers of entries.

    Example:
        >>> import torch
        >>> from instruments.early_stopping import early_stopping
        >>> _ = torch.manual_seed(0)
        >>> noise = torch.randn(64, 10, dtype=torch.float64)  # [N, D]
        >>> def eb(g):  # g: [N, D] individual gradients
        ...     return early_stopping((g**2).sum(0), g.mean(0), len(g))
        >>> eb(noise + 3.0) < 0  # a clear signal: keep training
        True
        >>> eb(noise - noise.mean(0)) > 0  # mean exactly zero: pure noise, stop
        True

    """
    n = check_batch_size(n)
    sgs = flat64(second_moment)
    g = flat64(grad)
    if sgs.numel() != g.numel():
        raise ValueError(f"second_moment has {sgs.numel()} entries but grad has {g.numel()}")
    if n < 2:
        return math.nan
    g_sq = g.square()
    var = (sgs - n * g_sq) / (n - 1)
    return 1.0 - n * float((g_sq / (var + eps)).mean())


@register_instrument
class EarlyStopping(Instrument):
    """Evidence-based early-stopping criterion (Mahsereci et al. 2017); stop when > 0.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments.early_stopping import early_stopping
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["early_stopping"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> g = 2 * (model(x) - y).detach() * torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: g_n
        >>> ref = early_stopping((g**2).sum(0), g.mean(0), 32)
        >>> abs(latest["early_stopping"] - ref) < 1e-9
        True
    """

    name = "early_stopping"
    requires = frozenset({SecondMoment()})
    cost = "first-order"
    panel = PanelSpec(
        "line",
        "gradients",
        "Early stopping (EB)",
        description="Is the gradient indistinguishable from noise (> 0)?",
    )

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        return second_moment_rows(ctx, self.name, early_stopping)
