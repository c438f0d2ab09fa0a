"""Gradient tests: norm, inner-product and orthogonality test (Cockpit definitions).

The tests measure how noisy the mini-batch gradient is relative to its size. Each
reports the smallest threshold (θ for the norm and inner-product test, ν for the
orthogonality test) at which the test would pass for the current batch; large values
mean noisy gradients, and a larger batch helps.

Notation (MATH.md): N samples with *unscaled* individual gradients ``g_n = ∇l_n`` and
their mean ``g = (1/N) Σ_n g_n``. Under ``reduction="mean"`` the batch gradient ``∇L``
is ``g``; under ``reduction="sum"`` it is ``N g``, so pass ``‖∇L‖² / N²`` as
``grad_norm_sq``. (Cockpit always multiplies BackPACK's ``1/N``-scaled individual
gradients by N, i.e. it assumes mean reduction.)

All three values scale as ``1/√N`` for a fixed gradient distribution, which gives
:func:`suggested_batch_size`.

Agreement with Cockpit v1.0.2 (``cockpit/quantities/{norm,inner,ortho}_test.py``):
same formulas, evaluated here in float64. Deliberate differences, all at inputs where
Cockpit's value is not a number of the test:

- ``N = 1``: Cockpit raises ``ZeroDivisionError`` (``1 / (batch_size - 1)`` in
  ``_compute_variance_l1`` and friends); here the result is NaN.
- ``‖g‖ = 0``: Cockpit divides by zero (inf, or NaN for 0/0); here NaN.
- A variance estimate that is negative only through rounding (e.g. all ``g_n``
  equal): Cockpit takes the square root of the negative residue (NaN); here it is
  clamped to 0 (see :data:`instruments._numerics.RADICAND_RTOL`), and clearly
  inconsistent inputs give NaN with a warning.
"""

from __future__ import annotations

import math

from torch import Tensor

from cockpit.quantities import BatchL2, GradDot
from instruments._numerics import as_scalar, check_batch_size, nonneg_difference
from instruments.base import (
    Instrument,
    PanelSpec,
    Record,
    Scalar,
    StepContext,
    host_floats,
    register_instrument,
    squared_norms,
)

__all__ = [
    "NormTest",
    "InnerTest",
    "OrthoTest",
    "BatchSize",
    "INNER_TEST_THRESHOLD",
    "NORM_TEST_THRESHOLD",
    "ORTHO_TEST_THRESHOLD",
    "inner_test",
    "norm_test",
    "ortho_test",
    "suggested_batch_size",
]

NORM_TEST_THRESHOLD = 0.9
"""Reference θ for the norm test (Byrd et al. 2012; Cockpit paper)."""

INNER_TEST_THRESHOLD = 0.9
"""Reference θ for the inner-product test (Bollapragada et al. 2018; Cockpit paper)."""

ORTHO_TEST_THRESHOLD = math.tan(math.radians(80.0))
"""Reference ν = tan 80° ≈ 5.67 for the orthogonality test (Bollapragada et al. 2018).

Note: MATH.md writes "tan 80° ≈ 5.84"; tan 80° is 5.671. The Cockpit v1.0.2 code has
no thresholds at all (its gauges draw the raw values), so this module keeps the
definition, tan 80°.
"""


def norm_test(sum_l2: float | Tensor, grad_norm_sq: float | Tensor, n: int) -> float:
    """Norm test (Byrd et al. 2012, Eq. 3.9): the smallest θ at which it passes.

    ``θ = √( (Σ_n ‖g_n‖² − N‖g‖²) / (N (N−1) ‖g‖²) )``, i.e. the standard error of
    the mean gradient, ``√(tr Σ̂ / N)`` with the unbiased sample covariance ``Σ̂`` of
    the ``g_n``, relative to ``‖g‖``.

    Args:
        sum_l2: ``Σ_n ‖g_n‖²`` over the unscaled individual gradients (scalar).
        grad_norm_sq: ``‖g‖²`` of the mean gradient ``g = (1/N) Σ_n g_n`` (scalar).
        n: Batch size N.

    Returns:
        θ as a float; NaN for ``N = 1`` or ``‖g‖ = 0``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> g = torch.randn(16, 5, dtype=torch.float64) + 1.0  # [N, D]: individual gradients
        >>> mean = g.mean(0)  # [D]
        >>> from instruments.gradient_tests import norm_test
        >>> theta = norm_test((g**2).sum(), mean.pow(2).sum(), 16)
        >>> ref = (g.var(0).sum() / 16).sqrt() / mean.norm()  # standard error over ‖ḡ‖
        >>> abs(theta - float(ref)) < 1e-12
        True

    """
    n = check_batch_size(n)
    sum_l2 = as_scalar(sum_l2, "sum_l2")
    grad_norm_sq = as_scalar(grad_norm_sq, "grad_norm_sq")
    if n < 2 or grad_norm_sq == 0.0:
        return math.nan
    # (N−1) × unbiased variance trace: Σ_n ‖g_n − g‖² = Σ_n ‖g_n‖² − N ‖g‖²
    ssd = nonneg_difference(sum_l2, n * grad_norm_sq, "norm test variance")
    return math.sqrt(ssd / (n * (n - 1) * grad_norm_sq))


def inner_test(sum_dot_sq: float | Tensor, grad_norm_sq: float | Tensor, n: int) -> float:
    """Inner-product test (Bollapragada et al. 2018, Eq. 2.6): smallest passing θ.

    ``θ = √( (Σ_n (g_nᵀg)² − N‖g‖⁴) / (N (N−1) ‖g‖⁴) )``: the standard error of the
    mean of the projections ``g_nᵀ g`` (whose mean is ``‖g‖²``), relative to ``‖g‖²``.

    Args:
        sum_dot_sq: ``Σ_n (g_nᵀ g)²`` (scalar). The projections must be summed over
            all layers before squaring, so this cannot be assembled from per-layer
            parts.
        grad_norm_sq: ``‖g‖²`` of the mean gradient (scalar).
        n: Batch size N.

    Returns:
        θ as a float; NaN for ``N = 1`` or ``‖g‖ = 0``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> g = torch.randn(16, 5, dtype=torch.float64) + 1.0  # [N, D]: individual gradients
        >>> mean = g.mean(0)  # [D]
        >>> from instruments.gradient_tests import inner_test
        >>> dots = g @ mean  # [N]: g_nᵀ ḡ
        >>> theta = inner_test((dots**2).sum(), mean.pow(2).sum(), 16)
        >>> ref = (dots.var() / 16).sqrt() / mean.pow(2).sum()
        >>> abs(theta - float(ref)) < 1e-12
        True

    """
    n = check_batch_size(n)
    sum_dot_sq = as_scalar(sum_dot_sq, "sum_dot_sq")
    grad_norm_sq = as_scalar(grad_norm_sq, "grad_norm_sq")
    if n < 2 or grad_norm_sq == 0.0:
        return math.nan
    grad_norm_4 = grad_norm_sq**2
    ssd = nonneg_difference(sum_dot_sq, n * grad_norm_4, "inner test variance")
    return math.sqrt(ssd / (n * (n - 1) * grad_norm_4))


def ortho_test(
    sum_l2: float | Tensor,
    sum_dot_sq: float | Tensor,
    grad_norm_sq: float | Tensor,
    n: int,
) -> float:
    """Orthogonality test (Bollapragada et al. 2018, Eq. 3.3): smallest passing ν.

    ``ν = √( Σ_n (‖g_n‖² − (g_nᵀg)²/‖g‖²) / (N (N−1) ‖g‖²) )``: the standard error
    of the components of the ``g_n`` orthogonal to ``g`` (their mean is zero),
    relative to ``‖g‖``.

    Args:
        sum_l2: ``Σ_n ‖g_n‖²`` (scalar).
        sum_dot_sq: ``Σ_n (g_nᵀ g)²`` (scalar).
        grad_norm_sq: ``‖g‖²`` of the mean gradient (scalar).
        n: Batch size N.

    Returns:
        ν as a float; NaN for ``N = 1`` or ``‖g‖ = 0``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> g = torch.randn(16, 5, dtype=torch.float64) + 1.0  # [N, D]: individual gradients
        >>> mean = g.mean(0)  # [D]
        >>> from instruments.gradient_tests import ortho_test
        >>> dots = g @ mean  # [N]
        >>> nu = ortho_test((g**2).sum(), (dots**2).sum(), mean.pow(2).sum(), 16)
        >>> ortho = g - dots[:, None] * mean / mean.pow(2).sum()  # components ⊥ ḡ, [N, D]
        >>> ref = (ortho.pow(2).sum() / (16 * 15)).sqrt() / mean.norm()
        >>> abs(nu - float(ref)) < 1e-12
        True

    """
    n = check_batch_size(n)
    sum_l2 = as_scalar(sum_l2, "sum_l2")
    sum_dot_sq = as_scalar(sum_dot_sq, "sum_dot_sq")
    grad_norm_sq = as_scalar(grad_norm_sq, "grad_norm_sq")
    if n < 2 or grad_norm_sq == 0.0:
        return math.nan
    # Σ_n ‖g_n − (g_nᵀg/‖g‖²) g‖² = Σ_n ‖g_n‖² − Σ_n (g_nᵀg)²/‖g‖²  (Cauchy–Schwarz ≥ 0)
    ssd = nonneg_difference(sum_l2, sum_dot_sq / grad_norm_sq, "ortho test variance")
    return math.sqrt(ssd / (n * (n - 1) * grad_norm_sq))


def suggested_batch_size(test_value: float, n: int, target: float) -> float:
    """Batch size at which a gradient test would reach ``target``.

    The tests scale as ``1/√N``, so ``N* = N (test_value / target)²``. Not reported
    by Cockpit. Not rounded: round up if an integer is needed.

    Args:
        test_value: The current value θ or ν (from a batch of size ``n``).
        n: The batch size it was measured with.
        target: The desired θ* or ν*, e.g. :data:`NORM_TEST_THRESHOLD`.

    Returns:
        ``N*`` as a float (NaN if ``test_value`` is NaN).

    Raises:
        ValueError: If ``target`` is not positive.

    Example:
        A norm test of 1.8 on a batch of 32: four times the batch halves it to 0.9.

        >>> from instruments.gradient_tests import NORM_TEST_THRESHOLD, suggested_batch_size
        >>> suggested_batch_size(1.8, 32, NORM_TEST_THRESHOLD)
        128.0

    """
    n = check_batch_size(n)
    if not target > 0.0:
        raise ValueError(f"target must be positive, got {target!r}")
    return n * (float(test_value) / target) ** 2


def _statistics(ctx: StepContext) -> dict[str, tuple[float, float, float]]:
    """``{param or "all": (Σ_n ‖g_n‖², Σ_n (g_nᵀ ḡ)², ‖ḡ‖²)}`` from the gathered quantities."""
    assert ctx.gathered is not None
    cached = ctx.__dict__.get("_gradient_test_statistics")
    if cached is not None:  # the three tests and the batch size share one step's sums
        return dict(cached)
    l2, dots = ctx.gathered[BatchL2()], ctx.gathered[GradDot()]
    keys = list(l2)
    mean_sq = squared_norms({k: ctx.mean_grads[k] for k in keys})
    total_dots = ctx.gathered.total(GradDot()).double()
    # one host copy for all of them (a GPU waits once, not twice per tensor)
    sums = host_floats(
        [l2[k].sum() for k in keys]
        + [(dots[k].double() ** 2).sum() for k in keys]
        + [(total_dots**2).sum()]
    )
    p = len(keys)
    out = {k: (sums[i], sums[p + i], mean_sq[k]) for i, k in enumerate(keys)}
    out["all"] = (
        sum(v[0] for v in out.values()),
        sums[-1],
        sum(v[2] for v in out.values()),
    )
    ctx.__dict__["_gradient_test_statistics"] = dict(out)
    return out


class _GradientTest(Instrument):
    requires = frozenset({BatchL2(), GradDot()})
    cost = "first-order"

    def _value(self, sum_l2: float, sum_dot_sq: float, grad_norm_sq: float, n: int) -> float:
        raise NotImplementedError

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        stats = _statistics(ctx)
        n = ctx.batch_size
        rows: list[Record] = [
            Scalar(ctx.step, self.name, self.name, "all", self._value(*stats.pop("all"), n))
        ]
        rows += [
            Scalar(ctx.step, self.name, self.name, k, self._value(*v, n)) for k, v in stats.items()
        ]
        return rows


@register_instrument
class NormTest(_GradientTest):
    """Norm test (Byrd et al. 2012), model-wide and per tensor; see :func:`norm_test`.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments.gradient_tests import norm_test
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["norm_test"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> g = 2 * (model(x) - y).detach() * torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: g_n
        >>> ref = norm_test((g**2).sum(), g.mean(0).pow(2).sum(), 32)
        >>> abs(latest["norm_test"] - ref) < 1e-9
        True
    """

    name = "norm_test"
    panel = PanelSpec(
        "gradient_tests",
        "gradients",
        "Gradient tests",
        metrics=("norm_test", "inner_test", "ortho_test"),
        description="How noisy is the mini-batch gradient? Large values: a larger batch helps.",
    )

    def _value(self, sum_l2, sum_dot_sq, grad_norm_sq, n):
        return norm_test(sum_l2, grad_norm_sq, n)


@register_instrument
class InnerTest(_GradientTest):
    """Inner-product test (Bollapragada et al. 2018); see :func:`inner_test`.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments.gradient_tests import inner_test
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["inner_test"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> g = 2 * (model(x) - y).detach() * torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: g_n
        >>> mean = g.mean(0)
        >>> ref = inner_test(((g @ mean) ** 2).sum(), mean.pow(2).sum(), 32)
        >>> abs(latest["inner_test"] - ref) < 1e-9
        True
    """

    name = "inner_test"
    panel = PanelSpec("line", "gradients", "Inner-product test", y_log=True)

    def _value(self, sum_l2, sum_dot_sq, grad_norm_sq, n):
        return inner_test(sum_dot_sq, grad_norm_sq, n)


@register_instrument
class OrthoTest(_GradientTest):
    """Orthogonality test (Bollapragada et al. 2018); see :func:`ortho_test`.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments.gradient_tests import ortho_test
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["ortho_test"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> g = 2 * (model(x) - y).detach() * torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: g_n
        >>> mean = g.mean(0)
        >>> ref = ortho_test((g**2).sum(), ((g @ mean) ** 2).sum(), mean.pow(2).sum(), 32)
        >>> abs(latest["ortho_test"] - ref) < 1e-9
        True
    """

    name = "ortho_test"
    panel = PanelSpec("line", "gradients", "Orthogonality test", y_log=True)

    def _value(self, sum_l2, sum_dot_sq, grad_norm_sq, n):
        return ortho_test(sum_l2, sum_dot_sq, grad_norm_sq, n)


@register_instrument
class BatchSize(Instrument):
    """Batch sizes at which each gradient test would hit its reference threshold.

    ``N* = N (θ/θ*)²`` with θ* = 0.9 (norm, inner) and tan 80° (ortho); metrics
    ``norm_test``, ``inner_test``, ``ortho_test`` (model-wide).

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["norm_test", "batch_size"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> sorted(k for k in latest if k.startswith("batch_size."))
        ['batch_size.inner_test', 'batch_size.norm_test', 'batch_size.ortho_test']
        >>> ref = 32 * (latest["norm_test"] / 0.9) ** 2  # N (θ / θ*)²
        >>> abs(latest["batch_size.norm_test"] - ref) < 1e-9
        True
    """

    name = "batch_size"
    requires = frozenset({BatchL2(), GradDot()})
    cost = "first-order"
    panel = PanelSpec(
        "line",
        "gradients",
        "Suggested batch size",
        metrics=("norm_test", "inner_test", "ortho_test"),
        y_log=True,
        description="Which batch size would make the gradient tests pass?",
    )

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        sum_l2, sum_dot_sq, gns = _statistics(ctx)["all"]
        n = ctx.batch_size
        tests = {
            "norm_test": (norm_test(sum_l2, gns, n), NORM_TEST_THRESHOLD),
            "inner_test": (inner_test(sum_dot_sq, gns, n), INNER_TEST_THRESHOLD),
            "ortho_test": (ortho_test(sum_l2, sum_dot_sq, gns, n), ORTHO_TEST_THRESHOLD),
        }
        return [
            Scalar(
                ctx.step,
                self.name,
                k,
                "all",
                suggested_batch_size(v, n, t) if math.isfinite(v) else math.nan,
            )
            for k, (v, t) in tests.items()
        ]
