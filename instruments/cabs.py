"""CABS: batch size suggested by coupling it to the learning rate (Balles et al. 2017).

Eq. 22 of the paper, as in Cockpit: ``B_CABS = lr · tr(Σ̂) / L`` with the biased
gradient variance ``tr(Σ̂) = (1/N) Σ_n ‖g_n − g‖² = (Σ_n ‖g_n‖² − N ‖g‖²) / N`` of the
*unscaled* individual gradients and the mean loss ``L = (1/N) Σ_n l_n`` (the rule
uses L as an estimate of the gap to the optimal loss 0, so it needs ``L > 0``).

Agreement with Cockpit v1.0.2 (``cockpit/quantities/cabs.py``, ``_compute``:
``lr · (B² sum_grad_squared − B grad²).sum() / (B · batch_loss)``): same formula.
Differences:

- Cockpit raises unless the optimizer is zero-momentum SGD and takes ``lr`` from its
  param groups. Here ``lr`` is an argument; for other optimizers use
  :func:`effective_lr` on the actual update (for plain SGD it returns the SGD learning
  rate, so the two agree).
- ``L ≤ 0``: Cockpit returns ±inf or a negative batch size; here NaN with a warning.
- Cockpit passes ``batch_loss`` as is, so under ``reduction="sum"`` it uses the summed
  loss; here ``loss`` is always the mean loss and ``g`` the mean gradient, which
  keeps the suggestion independent of the reduction (together with
  :func:`effective_lr`, which turns a sum-reduction SGD step ``−lr Σ_n g_n`` into
  ``lr_eff = N · lr`` with respect to the mean gradient).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from torch import Tensor

from cockpit.quantities import BatchL2
from instruments._numerics import as_scalar, check_batch_size, flat64, nonneg_difference
from instruments.base import (
    Instrument,
    PanelSpec,
    Record,
    Scalar,
    StepContext,
    Update,
    register_instrument,
    squared_norm,
)

__all__ = ["CABS", "cabs", "effective_lr"]


def cabs(
    lr: float,
    sum_l2: float | Tensor,
    grad_norm_sq: float | Tensor,
    n: int,
    loss: float | Tensor,
) -> float:
    """Batch size suggested by the CABS rule.

    Args:
        lr: (Effective) learning rate of the SGD step ``θ ← θ − lr · g``.
        sum_l2: ``Σ_n ‖g_n‖²`` over the unscaled individual gradients (scalar).
        grad_norm_sq: ``‖g‖²`` of the mean gradient ``g = (1/N) Σ_n g_n`` (scalar).
        n: Batch size N.
        loss: Mean mini-batch loss ``(1/N) Σ_n l_n`` (scalar).

    Returns:
        ``lr · (Σ_n ‖g_n‖² − N ‖g‖²) / (N · loss)`` as a float; NaN if ``loss ≤ 0``.
        Not rounded to an integer.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> g = torch.randn(16, 5, dtype=torch.float64) + 1.0  # [N, D]: individual gradients
        >>> from instruments.cabs import cabs
        >>> mean = g.mean(0)  # [D]
        >>> b = cabs(0.1, (g**2).sum(), mean.pow(2).sum(), 16, loss=0.5)
        >>> ref = 0.1 * g.var(0, unbiased=False).sum() / 0.5  # lr · tr(Σ̂) / L
        >>> abs(b - float(ref)) < 1e-12
        True

    """
    n = check_batch_size(n)
    sum_l2 = as_scalar(sum_l2, "sum_l2")
    grad_norm_sq = as_scalar(grad_norm_sq, "grad_norm_sq")
    loss = as_scalar(loss, "loss")
    if not loss > 0.0:
        warnings.warn(
            f"CABS needs a positive mean loss, got {loss!r}; returning NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan
    ssd = nonneg_difference(sum_l2, n * grad_norm_sq, "CABS gradient variance")
    return float(lr) * ssd / (n * loss)


def effective_lr(update: Tensor | Sequence[Tensor], grad: Tensor | Sequence[Tensor]) -> float:
    """Learning rate of the plain SGD step that best explains an actual update.

    ``lr_eff = −⟨d, g⟩ / ‖g‖²`` with the update ``d = θ_{t+1} − θ_t`` and the mean
    mini-batch gradient ``g`` at ``θ_t`` (the one the optimizer used). It is the
    least-squares fit ``argmin_a ‖d + a g‖²``: the length of the update's component
    along ``−g`` per unit gradient. For SGD without momentum or weight decay,
    ``d = −lr · g`` and ``lr_eff = lr`` exactly. For momentum, Adam and friends it
    counts only the part of the step that moves along the current gradient, which is
    the part CABS reasons about. (The alternative ``‖d‖ / ‖g‖`` also gives ``lr`` for
    SGD, but counts steps orthogonal to ``g`` as if they were gradient steps.)
    Weight decay applied by the optimizer is part of ``d`` and enters through its
    component along ``g``.

    Args:
        update: ``θ_{t+1} − θ_t``, one tensor or one per parameter tensor.
        grad: The mean gradient ``g`` at ``θ_t``, laid out like ``update``.

    Returns:
        ``lr_eff``; NaN if ``g = 0``. Warns when ``lr_eff ≤ 0`` (the update does not
        descend along the batch gradient, e.g. with strong momentum), since CABS then
        has no meaning.

    Raises:
        ValueError: If the two inputs hold different numbers of entries.

    Example:
        >>> import torch
        >>> from instruments.cabs import effective_lr
        >>> g = torch.tensor([1.0, -2.0, 0.5])  # [D]: the mean gradient
        >>> round(effective_lr(-0.1 * g, g), 6)  # plain SGD: the learning rate
        0.1
        >>> round(effective_lr(-0.1 * g + torch.tensor([2.0, 1.0, 0.0]), g), 6)  # ⊥ g ignored
        0.1

    """
    d = flat64(update)
    g = flat64(grad)
    if d.numel() != g.numel():
        raise ValueError(f"update has {d.numel()} entries but grad has {g.numel()}")
    g_norm_sq = float(g.dot(g))
    if g_norm_sq == 0.0:
        return math.nan
    lr_eff = -float(d.dot(g)) / g_norm_sq
    if lr_eff <= 0.0:
        warnings.warn(
            f"the update does not descend along the batch gradient (lr_eff = {lr_eff:.3e})",
            RuntimeWarning,
            stacklevel=2,
        )
    return lr_eff


@register_instrument
class CABS(Instrument):
    """CABS batch-size suggestion (Balles et al. 2017) for any optimizer.

    The learning rate is the effective one of the actual update (:func:`effective_lr`),
    which equals ``lr`` for plain SGD; the loss is the mean loss ``(1/N) Σ_n l_n``.
    Metrics: ``cabs`` and ``lr_eff``.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments.cabs import cabs
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["cabs"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     g = 2 * (model(x) - y).detach() * torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        ...     opt.step()  # CABS is computed from the actual update
        >>> latest = cockpit.latest()
        >>> round(latest["cabs.lr_eff"], 6)  # plain SGD: the learning rate
        0.1
        >>> ref = cabs(0.1, (g**2).sum(), g.mean(0).pow(2).sum(), 32, loss.detach())
        >>> abs(latest["cabs"] - ref) < 1e-9
        True
    """

    name = "cabs"
    requires = frozenset({BatchL2()})
    needs_update = True
    cost = "first-order"
    panel = PanelSpec("line", "gradients", "CABS batch size", y_log=True)

    def on_update(self, ctx: StepContext, update: Update) -> list[Record]:  # noqa: D102
        assert ctx.gathered is not None
        mean = ctx.mean_grads
        keys = list(update.delta)
        lr = effective_lr([update.delta[k] for k in keys], [mean[k] for k in keys])
        n = ctx.batch_size
        sum_l2 = float(ctx.gathered.total(BatchL2()).sum())
        gns = sum(squared_norm(mean[k]) for k in keys)
        loss = ctx.loss if ctx.reduction == "mean" else ctx.loss / n
        value = cabs(lr, sum_l2, gns, n, loss) if math.isfinite(lr) and lr > 0 else math.nan
        return [
            Scalar(ctx.step, self.name, self.name, "all", value),
            Scalar(ctx.step, self.name, "lr_eff", "all", lr),
        ]
