"""Normalized step length α from a noise-aware quadratic fit (Cockpit's Alpha).

For the step ``d = θ_{t+1} − θ_t`` of length ``τ = ‖d‖`` and direction ``u = d/τ``,
the loss along the step is modelled as ``q(x) = w0 + w1 x + w2 x²`` for ``x ∈ [0, τ]``
and fitted by weighted least squares to four noisy observations: the mean losses
``f0 = L_t(θ_t)`` and ``f1 = L_{t+1}(θ_{t+1})`` and the mean directional derivatives
``df0``, ``df1`` (means of the projections ``g_nᵀ u`` of the individual gradients of
the start batch at ``θ_t`` and of the end batch at ``θ_{t+1}``). With the design
``Φ`` (columns ``(1,0,0)``, ``(1,τ,τ²)``, ``(0,1,0)``, ``(0,1,2τ)``) and the weights
``Λ = diag(var_f0, var_f1, var_df0, var_df1)``,
``w = (Φ Λ⁻¹ Φᵀ)⁻¹ Φ Λ⁻¹ y`` with ``y = (f0, f1, df0, df1)ᵀ``, and

``α = τ / x_min − 1`` with ``x_min = −w1 / (2 w2)``:

−1 means no progress, 0 stepping to the minimum of the fit, +1 stepping to the same
height on the other side, > 1 overshooting. ``α = −1`` when the fit is concave
(``w2 < 0``).

Agreement with Cockpit v1.0.2 (``cockpit/quantities/alpha.py``: ``_fit_quadratic``,
``_get_alpha``, ``_save_0th_order_info``, ``_project_with_backpack_finalize``,
``_exact_variance``):

- Weights are the *unbiased sample variances of the individual values*
  (``torch.var()`` of the individual losses, ``projections.var()`` or
  ``np.var(..., ddof=1)`` of the projections), **not** divided by N, although the
  observations are means. A common factor in Λ does not change ``w``, so this only
  matters when the start and end batches differ in size, or through the zero floor
  below; we follow Cockpit.
- A variance that is exactly 0 is replaced by 1e-10 with a warning (one warning for
  the function values, one for the derivatives), as in Cockpit.
- ``τ = 0``: Cockpit's fit is singular and ``_get_alpha`` returns −1 for it; so do we.
- For ``τ > 0`` and finite positive variances the fit is never singular. An infinite
  variance (no information from that observation) can leave it undetermined (Cockpit:
  ``LinAlgError`` → ``None``); here any infinite variance gives NaN with a warning,
  and any NaN input gives NaN.
- ``α = τ/x_min − 1`` is Cockpit's ``2τ/ᾱ − 1`` with ``ᾱ = −w1/w2 = 2 x_min``. The
  degenerate ``w2 = 0`` gives Cockpit's value as well: −1 (its ``2τ/±inf − 1``), or
  NaN when also ``w1 = 0``. ``w2 > 0 = w1`` (the fit's minimum at the start point)
  gives +inf, where Cockpit's signed-zero division gives ±inf.
- Numerics: Cockpit forms the normal equations and inverts them
  (``np.linalg.inv(Φ Λ⁻¹ Φᵀ) @ Φ Λ⁻¹ y``). We solve the same weighted least-squares
  problem in closed form. Four observations and three parameters leave one residual
  direction: ``q`` fits the data exactly iff ``zᵀy = 0`` with ``z = (−2, 2, −τ, −τ)``
  (``2 (f1 − f0) = τ (df0 + df1)``, the trapezoidal rule, exact for quadratics). The
  weighted fit removes the misfit ``c = zᵀy`` along ``Λ z``:
  ``ŷ = y − Λ z c / (zᵀ Λ z)``, so the fitted slopes are
  ``s_i = df_i + τ var_df_i c / (4 (var_f0 + var_f1) + τ² (var_df0 + var_df1))``,
  ``w1 = s0``, ``w2 = (s1 − s0) / (2τ)``, and ``α = −s1 / s0`` (concave iff
  ``s1 < s0``). No matrix is inverted, so the result stays accurate however far apart
  the weights are. With the 1e-10 floor active they are ~10¹⁰ apart, and Cockpit's
  inverse is then off by about 1e-6 (relative) from the exact rational solution, ours
  by about 1e-15; elsewhere both agree to rounding (checked against Cockpit 1.0.2
  itself: 1e-15).

Sign conventions: ``df0``, ``df1`` are directional derivatives along ``u`` (the
direction actually stepped), so a descent step has ``df0 < 0``. Both points use the
same ``u``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from cockpit.quantities import Projection
from instruments.base import (
    Instrument,
    PanelSpec,
    Plan,
    Record,
    Scalar,
    StepContext,
    Update,
    host_floats,
    register_instrument,
)

__all__ = ["Alpha", "ZERO_VARIANCE_FLOOR", "alpha", "alpha_from_samples"]

ZERO_VARIANCE_FLOOR = 1e-10
"""Value that replaces an exactly zero variance in the fit weights (as in Cockpit)."""


def _floor_zero_variances(var_a: float, var_b: float, what: str) -> tuple[float, float]:
    if var_a == 0.0 or var_b == 0.0:
        warnings.warn(
            f"The variance of {what} is 0, using {ZERO_VARIANCE_FLOOR:g} instead.",
            RuntimeWarning,
            stacklevel=3,
        )
    return (
        ZERO_VARIANCE_FLOOR if var_a == 0.0 else var_a,
        ZERO_VARIANCE_FLOOR if var_b == 0.0 else var_b,
    )


def alpha(
    tau: float,
    f0: float,
    f1: float,
    var_f0: float,
    var_f1: float,
    df0: float,
    df1: float,
    var_df0: float,
    var_df1: float,
) -> float:
    """Normalized step length α from means and variances at both points.

    Args:
        tau: Step length ``τ = ‖θ_{t+1} − θ_t‖ ≥ 0``.
        f0: Mean loss of the start batch at ``θ_t``.
        f1: Mean loss of the end batch at ``θ_{t+1}``.
        var_f0: Unbiased sample variance of the start batch's individual losses.
        var_f1: Same for the end batch.
        df0: Mean of the projections ``g_nᵀ u`` of the start batch at ``θ_t``.
        df1: Mean of the projections ``g_nᵀ u`` of the end batch at ``θ_{t+1}``.
        var_df0: Unbiased sample variance of the start projections.
        var_df1: Same for the end projections.

    Returns:
        α as a float: −1 for ``τ = 0`` (singular fit, Cockpit's value) or a concave
        fit; NaN if an input is NaN or infinite (the fit is then undetermined).

    Raises:
        ValueError: If ``tau`` or a variance is negative.

    Example:
        On ``L(θ) = θ²`` without noise, stepping from θ = 1 to the minimum gives 0, to the
        same height on the other side +1, and a short step close to −1 (little progress):

        >>> from instruments.alpha import alpha
        >>> def along(t0, t1):  # τ, losses and slopes along u = sign(t1 − t0); variances 1
        ...     u = 1.0 if t1 > t0 else -1.0
        ...     return alpha(abs(t1 - t0), t0**2, t1**2, 1, 1, 2 * t0 * u, 2 * t1 * u, 1, 1)
        >>> round(along(1.0, 0.0), 6), round(along(1.0, -1.0), 6), round(along(1.0, 0.9), 6)
        (0.0, 1.0, -0.9)

    """
    tau = float(tau)
    f0, f1, df0, df1 = (float(v) for v in (f0, f1, df0, df1))
    var_f = (float(var_f0), float(var_f1))
    var_df = (float(var_df0), float(var_df1))
    if tau < 0.0 or any(v < 0.0 for v in var_f + var_df):
        raise ValueError("tau and the variances must be non-negative")
    if any(math.isnan(v) for v in (tau, f0, f1, df0, df1, *var_f, *var_df)):
        return math.nan
    var_f = _floor_zero_variances(*var_f, "f")
    var_df = _floor_zero_variances(*var_df, "df")
    if tau == 0.0:
        warnings.warn(
            "The two observations were at the same point; alpha = -1.",
            RuntimeWarning,
            stacklevel=2,
        )
        return -1.0
    if not all(math.isfinite(v) for v in (tau, f0, f1, df0, df1, *var_f, *var_df)):
        warnings.warn(
            "Could not compute the quadratic fit (undetermined by infinite values); alpha = NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan

    # Misfit along the single residual direction z = (−2, 2, −τ, −τ) and its
    # weighted removal: ŷ = y − Λ z c / (zᵀ Λ z). Fitted slopes s0 = w1, s1 = w1 + 2τ w2.
    misfit = 2.0 * (f1 - f0) - tau * (df0 + df1)
    z_lambda_z = 4.0 * (var_f[0] + var_f[1]) + tau**2 * (var_df[0] + var_df[1])
    shift = tau * misfit / z_lambda_z
    s0 = df0 + var_df[0] * shift
    s1 = df1 + var_df[1] * shift
    if s1 < s0:  # w2 < 0: concave
        return -1.0
    if s0 == 0.0:  # w1 = 0: NaN if also w2 = 0, else the start is the minimum
        return math.nan if s1 == s0 else math.inf
    # α = τ / x_min − 1 = −2τ w2 / w1 − 1 = −s1 / s0
    return -s1 / s0


def _moments(x: Tensor, name: str) -> tuple[Tensor, Tensor | None]:
    """Mean and unbiased variance in float64 on ``x``'s device (no variance of one value)."""
    x = x.detach().reshape(-1).to(torch.float64)
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    return x.mean(), (x.var(correction=1) if x.numel() >= 2 else None)


def alpha_from_samples(
    tau: float,
    losses0: Tensor,
    losses1: Tensor,
    proj0: Tensor,
    proj1: Tensor,
) -> float:
    """Normalized step length α from individual losses and projections.

    Means and unbiased variances are taken in float64, as Cockpit takes them with
    ``.mean()`` / ``.var()`` (in the tensors' own dtype).

    Args:
        tau: Step length ``τ = ‖θ_{t+1} − θ_t‖``.
        losses0: Individual losses ``l_n(θ_t)`` of the start batch, shape ``[N0]``.
        losses1: Individual losses ``l_n(θ_{t+1})`` of the end batch, ``[N1]``.
        proj0: Projections ``g_nᵀ u`` of the unscaled individual gradients of the
            start batch at ``θ_t`` onto ``u = (θ_{t+1} − θ_t)/τ``, shape ``[N0]``.
        proj1: Same for the end batch at ``θ_{t+1}``, shape ``[N1]``.

    Returns:
        α (see :func:`alpha`); NaN when a batch has a single sample (no variance).

    Raises:
        ValueError: If the losses and projections of one point differ in length.

    Example:
        >>> import torch
        >>> from instruments.alpha import alpha_from_samples
        >>> losses0 = torch.tensor([1.1, 0.9], dtype=torch.float64)  # [N0]: l_n(θ_t)
        >>> losses1 = torch.tensor([0.9, 1.1], dtype=torch.float64)  # [N1]: l_n(θ_{t+1})
        >>> proj0 = torch.tensor([-2.1, -1.9], dtype=torch.float64)  # [N0]: g_nᵀ u at θ_t
        >>> proj1 = torch.tensor([1.9, 2.1], dtype=torch.float64)  # [N1]: g_nᵀ u at θ_{t+1}
        >>> round(alpha_from_samples(2.0, losses0, losses1, proj0, proj1), 6)  # θ² from 1 to -1
        1.0

    """
    for point, (losses, proj) in enumerate(((losses0, proj0), (losses1, proj1))):
        if losses.numel() != proj.numel():
            raise ValueError(
                f"point {point}: {losses.numel()} losses but {proj.numel()} projections"
            )
    named = ((losses0, "losses0"), (losses1, "losses1"), (proj0, "proj0"), (proj1, "proj1"))
    stats = [v for x, name in named for v in _moments(x, name)]
    found = iter(host_floats([v for v in stats if v is not None]))  # one copy per device
    f0, var_f0, f1, var_f1, df0, var_df0, df1, var_df1 = (
        math.nan if v is None else next(found) for v in stats
    )
    return alpha(tau, f0, f1, var_f0, var_f1, df0, df1, var_df0, var_df1)


_KEY = "alpha_step"


class _Start:
    """What alpha keeps from step t until step t+1: no per-sample gradients, just [N] vectors."""

    def __init__(
        self, step: int, tau: float, u: dict[str, Tensor] | None, losses: Tensor, proj: Tensor
    ):
        self.step, self.tau, self.u, self.losses, self.proj = step, tau, u, losses, proj


@register_instrument
class Alpha(Instrument):
    """Normalized step length α (Cockpit's alpha) for any optimizer.

    On a tracked step t it keeps the individual losses and, right after
    ``optimizer.step()``, the per-sample projections ``g_nᵀ u`` onto the actual step
    direction ``u = d/‖d‖`` at θ_t (one forward-mode pass; no per-sample gradients are
    cached). On the next call of ``cockpit.step`` (step t+1, tracked or not) it gathers
    the end-point projections onto ``u`` and the individual losses at θ_{t+1} and logs
    α for step t. The last tracked step of a run has no end point and gets no α.

    Example:
        Full-batch linear regression with plain SGD: a cautious learning rate gives α ≈ −1,
        a too-large one α > 0, growing past +1 as the iterates overshoot further, while the
        loss still falls at first.

        >>> import torch
        >>> from cockpit import Cockpit
        >>> def run(lr, steps=4):
        ...     _ = torch.manual_seed(0)
        ...     model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        ...     x = torch.randn(32, 3).double()  # [N, D_in]
        ...     w = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
        ...     y = x @ w + 0.1 * torch.randn(32, 1).double()  # [N, 1]
        ...     opt = torch.optim.SGD(model.parameters(), lr=lr)
        ...     alphas, losses = [], []
        ...     with Cockpit(model, loss_fn, opt, ["alpha", "loss"]) as cockpit:
        ...         for step in range(steps):
        ...             opt.zero_grad()
        ...             loss = loss_fn(model(x), y)
        ...             with cockpit.step(step, loss):  # logs α of the previous step
        ...                 loss.backward()
        ...             opt.step()
        ...             alphas.append(round(cockpit.latest().get("alpha", float("nan")), 2))
        ...             losses.append(round(cockpit.latest()["loss"], 2))
        ...     return alphas[1:], losses
        >>> run(lr=0.01)
        ([-0.98, -0.98, -0.98], [6.05, 5.84, 5.64, 5.44])
        >>> run(lr=0.9)
        ([0.73, 1.18, 1.33], [6.05, 3.47, 4.79, 8.43])
    """

    name = "alpha"
    cost = "first-order"
    panel = PanelSpec(
        "alpha",
        "step_size",
        "Alpha",
        description="Does the step over- or undershoot the local minimum?",
    )

    def __init__(self, schedule=None) -> None:
        super().__init__(schedule)
        self._start: _Start | None = None
        self._candidate: tuple[int, Tensor] | None = None

    def plan(self, step: int) -> Plan | None:  # noqa: D102
        start = self.schedule is not None and self.schedule(step)
        end = self._start is not None
        if not (start or end):
            return None
        quantities, directions = frozenset(), {}
        if end and self._start.u is not None:
            quantities = frozenset({Projection(_KEY)})
            directions = {_KEY: self._start.u}
        return Plan(quantities, directions, individual_losses=True, update=start, output_grad=start)

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        rows: list[Record] = []
        start, self._start = self._start, None
        if start is not None:
            if start.u is None:  # the step did not move: Cockpit's α for τ = 0
                proj1 = torch.zeros_like(start.proj)
            else:
                assert ctx.gathered is not None
                proj1 = ctx.gathered.total(Projection(_KEY))
            value = alpha_from_samples(
                start.tau, start.losses, ctx.individual_losses, start.proj, proj1
            )
            rows.append(Scalar(start.step, self.name, self.name, "all", value))
        scheduled = self.schedule is not None and self.schedule(ctx.step)
        self._candidate = (ctx.step, ctx.individual_losses) if scheduled else None
        return rows

    def on_update(self, ctx: StepContext, update: Update) -> list[Record]:  # noqa: D102
        if self._candidate is None or self._candidate[0] != ctx.step:
            return []
        step, losses = self._candidate
        self._candidate = None
        tau = update.norm
        if tau == 0.0:
            self._start = _Start(step, 0.0, None, losses, torch.zeros_like(losses))
            return []
        u = {k: (d / tau) for k, d in update.delta.items()}
        self._start = _Start(step, tau, u, losses, ctx.update_derivatives(update))
        return []
