"""Quantity keys: what the engine can gather during one backward pass.

Each key is a frozen dataclass, so equal requests deduplicate (two instruments
asking for ``Hist1D(bins=100)`` share one computation, while ``Hist1D(bins=50)``
is a different quantity). All per-sample quantities describe the *unscaled*
individual gradients ``g_n = ∇ l_n``, where the batch loss is
``L = (1/N) Σ_n l_n`` (``reduction="mean"``) or ``L = Σ_n l_n`` (``"sum"``). The
curvature keys (:class:`DiagGGN`, :class:`DiagHessian`) describe the batch loss ``L``
itself (its normalization included); their model-wide total is the trace.

Shape letters: N batch, P the shape of one parameter tensor, B bins.

Example:
    >>> from cockpit.quantities import BatchL2, Hist1D
    >>> {BatchL2(), BatchL2(), Hist1D(bins=10)} == {BatchL2(), Hist1D(bins=10)}
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Quantity",
    "BatchL2",
    "BatchDot",
    "SecondMoment",
    "GradDot",
    "Projection",
    "IndividualGradients",
    "Hist1D",
    "Hist2D",
    "DiagGGN",
    "DiagHessian",
    "CURVATURE",
    "FIRST_ORDER",
    "Gathered",
    "variance",
]


@dataclass(frozen=True)
class Quantity:
    """Base class of all quantity keys.

    Subclasses are frozen dataclasses: hashable values, so equal requests share one
    computation and the configuration is part of the key.

    Example:
        >>> from cockpit.quantities import BatchL2, Hist1D, Quantity, SecondMoment
        >>> issubclass(Hist1D, Quantity), Hist1D(bins=10) == Hist1D(bins=10)
        (True, True)
        >>> len({Hist1D(bins=10), Hist1D(bins=20)})  # different configurations
        2
        >>> BatchL2.total_mode, SecondMoment.total_mode  # how a model-wide total is formed
        ('sum', None)
    """

    #: How per-parameter results combine into the model-wide total:
    #: ``"sum"`` (add tensors of equal shape), ``"trace"`` (sum of all entries, for
    #: diagonals) or ``None`` (no model-wide total).
    total_mode = "sum"


@dataclass(frozen=True)
class BatchL2(Quantity):
    """Squared norms ``‖g_n‖²`` of the individual gradients; per parameter ``[N]``.

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import BatchL2, IndividualGradients
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([BatchL2(), IndividualGradients()]) as result:
        ...         loss.backward()
        >>> result[BatchL2()]["weight"].shape  # [N]
        torch.Size([4])
        >>> g = result[IndividualGradients()]["weight"]  # [N, D_out, D_in]
        >>> torch.allclose(result[BatchL2()]["weight"], g.flatten(1).pow(2).sum(1))
        True
        >>> result.total(BatchL2()).shape  # ‖g_n‖² over all parameters
        torch.Size([4])
    """


@dataclass(frozen=True)
class BatchDot(Quantity):
    """Gram matrix ``⟨g_n, g_m⟩`` of the individual gradients; per parameter ``[N, N]``.

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import BatchDot, IndividualGradients
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([BatchDot(), IndividualGradients()]) as result:
        ...         loss.backward()
        >>> gram = result[BatchDot()]["weight"]  # [N, N]
        >>> g = result[IndividualGradients()]["weight"].flatten(1)  # [N, D]
        >>> gram.shape, torch.allclose(gram, g @ g.T)
        (torch.Size([4, 4]), True)
    """


@dataclass(frozen=True)
class SecondMoment(Quantity):
    """Second moment ``Σ_n g_n²`` per coordinate; per parameter ``[*P]``.

    The (biased) variance of the individual gradients follows as
    ``second_moment / N - mean²``; see :func:`variance`.

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import IndividualGradients, SecondMoment, variance
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([SecondMoment(), IndividualGradients()]) as result:
        ...         loss.backward()
        >>> m2 = result[SecondMoment()]["weight"]  # [*P] = [2, 3]
        >>> g = result[IndividualGradients()]["weight"]  # [N, 2, 3]
        >>> m2.shape, torch.allclose(m2, (g**2).sum(0))
        (torch.Size([2, 3]), True)
        >>> torch.allclose(variance(m2, g.mean(0), 4), g.var(0, unbiased=False))
        True
    """

    total_mode = None


@dataclass(frozen=True)
class GradDot(Quantity):
    """Products ``⟨g_n, ḡ⟩`` with the mean gradient ``ḡ = (1/N) Σ_m g_m``; per parameter ``[N]``.

    ``ḡ`` is the mean of the individual gradients for both reductions (for
    ``reduction="sum"`` it is the batch gradient divided by N), which is what the
    gradient tests need. The model-wide total is ``⟨g_n, ḡ⟩`` over all parameters.

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import GradDot, IndividualGradients
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([GradDot(), IndividualGradients()]) as result:
        ...         loss.backward()
        >>> g = result[IndividualGradients()]["weight"].flatten(1)  # [N, D]
        >>> mean = model.weight.grad.flatten() / 4  # "sum": the batch gradient over N
        >>> torch.allclose(result[GradDot()]["weight"], g @ mean)
        True
    """


@dataclass(frozen=True)
class Projection(Quantity):
    """Projections ``⟨g_n, u⟩`` onto a direction ``u``; per parameter ``[N]``.

    The direction is passed to :meth:`cockpit.engine.Engine.gather` under
    ``directions[key]`` as a mapping from parameter name to a tensor shaped like
    the parameter. Parameters missing from the mapping count as zero.

    Args:
        key: Name of the direction in ``directions``.

    Example:
        Project the individual gradients onto the sign of the batch gradient (only the
        weight; the bias counts as zero):

        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import IndividualGradients, Projection
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     u = {"weight": torch.ones(2, 3, dtype=torch.float64)}
        ...     keys = [Projection("u"), IndividualGradients()]
        ...     with engine.gather(keys, directions={"u": u}) as result:
        ...         loss.backward()
        >>> g = result[IndividualGradients()]["weight"]  # [N, 2, 3]
        >>> proj = result.total(Projection("u"))  # [N], summed over parameters
        >>> torch.allclose(proj, (g * u["weight"]).flatten(1).sum(1))
        True
    """

    key: str = "u"


@dataclass(frozen=True)
class IndividualGradients(Quantity):
    """The individual gradients themselves, per parameter ``[N, *P]``.

    Memory grows as N × D; request it only when needed. It is never concatenated
    into a model-wide tensor.

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import IndividualGradients
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([IndividualGradients()]) as result:
        ...         loss.backward()
        >>> g = result[IndividualGradients()]
        >>> g["weight"].shape, g["bias"].shape  # [N, *P]
        (torch.Size([4, 2, 3]), torch.Size([4, 2]))
        >>> torch.allclose(g["weight"].sum(0), model.weight.grad)  # reduction="sum"
        True
    """

    total_mode = None


@dataclass(frozen=True)
class Hist1D(Quantity):
    """Histogram of all N·D individual-gradient entries; per parameter ``[B]`` (float64).

    Values outside ``range`` are clamped into the edge bins. Bins are half-open
    ``[e_k, e_{k+1})`` except the last, which also takes everything above.

    Args:
        bins: Number of bins B.
        range: ``(low, high)`` of the bins.

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import Hist1D
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([Hist1D(bins=4)]) as result:
        ...         loss.backward()
        >>> counts = result[Hist1D(bins=4)]["weight"]  # [B]: N·D = 4·6 entries
        >>> counts.shape, int(counts.sum())
        (torch.Size([4]), 24)
        >>> Hist1D(bins=4).edges().tolist()  # [B + 1], float64
        [-2.0, -1.0, 0.0, 1.0, 2.0]
    """

    bins: int = 100
    range: tuple[float, float] = (-2.0, 2.0)

    def __post_init__(self) -> None:
        _check_bins("Hist1D", self.bins, self.range)

    def edges(self) -> Tensor:
        """Return the B + 1 bin edges (float64)."""
        return _edges(self.bins, self.range)


@dataclass(frozen=True)
class Hist2D(Quantity):
    """Joint histogram of ``(g_nj, θ_j)`` pairs; per parameter ``[B_g, B_θ]`` (float64).

    Clamped into the edge bins like :class:`Hist1D`.

    Args:
        bins: ``(B_g, B_θ)`` numbers of gradient and parameter bins.
        range: ``((g_low, g_high), (θ_low, θ_high))``.

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import Hist2D
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([Hist2D(bins=(3, 2))]) as result:
        ...         loss.backward()
        >>> counts = result[Hist2D(bins=(3, 2))]["weight"]  # [B_g, B_θ]
        >>> counts.shape, int(counts.sum())  # N·D = 4·6 pairs
        (torch.Size([3, 2]), 24)
        >>> [e.tolist() for e in Hist2D(bins=(3, 2)).edges()]
        [[-1.0, -0.33..., 0.33..., 1.0], [-2.0, 0.0, 2.0]]
    """

    bins: tuple[int, int] = (40, 50)
    range: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-2.0, 2.0))

    def __post_init__(self) -> None:
        _check_bins("Hist2D (gradient axis)", self.bins[0], self.range[0])
        _check_bins("Hist2D (parameter axis)", self.bins[1], self.range[1])

    def edges(self) -> tuple[Tensor, Tensor]:
        """Return the gradient and parameter bin edges (float64)."""
        return _edges(self.bins[0], self.range[0]), _edges(self.bins[1], self.range[1])


def _edges(bins: int, rng: tuple[float, float]) -> Tensor:
    """``bins + 1`` float64 edges exactly as ``numpy.linspace`` computes them."""
    return torch.from_numpy(np.linspace(rng[0], rng[1], bins + 1))


@dataclass(frozen=True)
class DiagGGN(Quantity):
    """Diagonal of the generalized Gauss-Newton matrix of the batch loss; per parameter ``[*P]``.

    ``GGN = Σ_n J_nᵀ (∂²L/∂f_n²) J_n`` with ``J_n`` the Jacobian of sample n's model
    output (the loss module's input) w.r.t. the parameters and ``L`` the *batch* loss
    the loss module returns, normalization included: under ``reduction="mean"`` this is
    the GGN of ``L = (1/N) Σ_n l_n`` (the curvature TIC and the Hessian trace use), under
    ``"sum"`` that of ``Σ_n l_n``. Unlike the first-order quantities it is *not* rescaled
    to individual losses. The model-wide total (:meth:`Gathered.total`) is the trace.

    Args:
        mc_samples: 0 for the exact diagonal (backpropagates all K columns of the
            loss-Hessian square root, e.g. K = C classes for cross-entropy); M > 0 for the
            unbiased Monte-Carlo estimate from M sampled columns, drawn with the
            engine's generator (see ``Engine(seed=...)``).

    Example:
        For a linear model under the summed squared error the GGN is the Hessian,
        ``2 Σ_n x_n x_nᵀ`` for each output row, so its diagonal is ``2 Σ_n x_nj²``:

        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import DiagGGN
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn, seed=0) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([DiagGGN(), DiagGGN(mc_samples=1)]) as result:
        ...         loss.backward()
        >>> diag = result[DiagGGN()]["weight"]  # [*P] = [2, 3]
        >>> torch.allclose(diag, 2 * (x**2).sum(0).expand(2, 3))
        True
        >>> result.exact[DiagGGN()], result.exact[DiagGGN(mc_samples=1)]
        (True, False)
        >>> result[DiagGGN(mc_samples=1)]["weight"].shape
        torch.Size([2, 3])
    """

    mc_samples: int = 0
    total_mode = "trace"

    def __post_init__(self) -> None:
        if isinstance(self.mc_samples, bool) or int(self.mc_samples) != self.mc_samples:
            raise ValueError(f"DiagGGN: mc_samples must be an integer, got {self.mc_samples!r}")
        if self.mc_samples < 0:
            raise ValueError(f"DiagGGN: mc_samples must be >= 0, got {self.mc_samples}")


@dataclass(frozen=True)
class DiagHessian(Quantity):
    """Diagonal of the Hessian of the batch loss ``L``; per parameter ``[*P]``.

    Exact when the engine can prove it: the diagonal GGN plus the residual terms of the
    elementwise activation *modules* (``nn.Tanh``, ``nn.Sigmoid``, ``nn.GELU``, ...),
    which is the whole Hessian diagonal when every other operation between the
    parameters and the loss is linear, piecewise linear, or bilinear in operands that
    depend on disjoint parameters (see :mod:`cockpit.curvature`). Otherwise (LayerNorm,
    attention, a functional ``torch.tanh``, a weight used twice, ...) or when the
    residual terms would exceed ``residual_budget``, the engine warns, naming the
    reason, and returns the Hutchinson estimate ``(1/K) Σ_k v_k ⊙ H v_k`` with K =
    ``probes`` Rademacher probes (Hessian-vector products on a re-evaluation of the
    loss, see :class:`cockpit.linops.HessianOperator`). ``Gathered.exact[key]`` says
    which one was returned. Scaling as for :class:`DiagGGN`.

    Args:
        probes: Number of Hutchinson probes of the fallback.
        residual_budget: Largest number of tensor elements the exact residual terms may
            produce in total (columns × layer-output elements, summed over the
            activation calls), a proxy for their cost; beyond it the fallback is used.

    Example:
        A tanh network, checked against the Hessian from ``torch.func``:

        >>> import torch
        >>> from torch import nn
        >>> from torch.func import functional_call, hessian
        >>> from cockpit import Engine
        >>> from cockpit.quantities import DiagHessian
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> loss_fn = nn.MSELoss()
        >>> x, y = torch.randn(5, 3).double(), torch.randn(5, 1).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([DiagHessian()]) as result:
        ...         loss.backward()
        >>> result.exact[DiagHessian()]  # GGN plus the Tanh module's residual term
        True
        >>> params = {k: p.detach() for k, p in model.named_parameters()}
        >>> def loss_of(w):
        ...     return loss_fn(functional_call(model, {**params, "0.weight": w}, (x,)), y)
        >>> h = hessian(loss_of)(params["0.weight"]).reshape(6, 6)
        >>> torch.allclose(result[DiagHessian()]["0.weight"], h.diagonal().reshape(2, 3))
        True
    """

    probes: int = 64
    residual_budget: int = 1 << 30
    total_mode = "trace"

    def __post_init__(self) -> None:
        if int(self.probes) != self.probes or self.probes < 1:
            raise ValueError(f"DiagHessian: probes must be a positive integer, got {self.probes!r}")
        if int(self.residual_budget) != self.residual_budget or self.residual_budget < 0:
            raise ValueError(
                f"DiagHessian: residual_budget must be a non-negative integer, "
                f"got {self.residual_budget!r}"
            )


def _check_bins(what: str, bins: int, rng: tuple[float, float]) -> None:
    if int(bins) != bins or bins < 1:
        raise ValueError(f"{what}: bins must be a positive integer, got {bins!r}")
    lo, hi = rng
    if not lo < hi:
        raise ValueError(f"{what}: range must satisfy low < high, got {rng!r}")


def tensor_versions(factor: Any) -> dict[str, int]:
    """Version counters of the tensors a factor holds (in-place updates change them)."""
    return {k: v._version for k, v in vars(factor).items() if isinstance(v, Tensor)}


#: The first-order quantities that need no configuration.
FIRST_ORDER = (BatchL2(), BatchDot(), SecondMoment(), GradDot())
#: The curvature quantity types (gathered by :mod:`cockpit.curvature`).
CURVATURE = (DiagGGN, DiagHessian)


@dataclass
class Gathered:
    """What one backward pass gathered, per parameter and model-wide.

    Attributes:
        batch_size: N.
        reduction: ``"mean"`` or ``"sum"``, the loss reduction the scaling assumed.
        per_param: ``{quantity: {parameter name: tensor}}``.
        exact: For curvature quantities, whether the value is exact (False: an
            estimate, e.g. Monte-Carlo or the Hutchinson fallback of
            :class:`DiagHessian`).
        notes: For curvature quantities, how the value was obtained (and why a
            fallback was needed).

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import BatchL2, DiagGGN, SecondMoment
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
        >>> with Engine(model, loss_fn) as engine:
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([BatchL2(), SecondMoment(), DiagGGN()]) as result:
        ...         loss.backward()
        >>> result.batch_size, result.reduction, BatchL2() in result
        (4, 'sum', True)
        >>> sorted(result[BatchL2()])  # {parameter name: [N]}
        ['bias', 'weight']
        >>> torch.allclose(  # ‖g_n‖² over all parameters
        ...     result.total(BatchL2()), result[BatchL2()]["weight"] + result[BatchL2()]["bias"]
        ... )
        True
        >>> trace = result.total(DiagGGN())  # 2 Σ x² per output row, plus 2N per bias entry
        >>> torch.allclose(trace, 2 * 2 * (x**2).sum() + 2 * 2 * 4)
        True
        >>> result.exact[DiagGGN()]
        True
        >>> result.total(SecondMoment())
        Traceback (most recent call last):
        ...
        ValueError: SecondMoment() has no model-wide total; use per-parameter values
    """

    batch_size: int
    reduction: str
    per_param: dict[Quantity, dict[str, Tensor]] = field(default_factory=dict)
    exact: dict[Quantity, bool] = field(default_factory=dict)
    notes: dict[Quantity, str] = field(default_factory=dict)
    #: ``{parameter name: (factor, parameter value, tensor versions)}`` kept by
    #: ``Engine.gather(keep_factors=True)`` for :meth:`project`.
    kept: dict[str, tuple[Any, Tensor, dict[str, int]]] = field(default_factory=dict, repr=False)

    def project(self, direction: dict[str, Tensor]) -> Tensor | None:
        """Per-sample ``⟨g_n, u⟩`` from the kept per-layer factors, after the pass.

        The direction may be chosen after the backward pass (alpha projects on the
        update ``θ_{t+1} − θ_t``, known only after ``optimizer.step()``): the factors of
        ``Engine.gather(keep_factors=True)`` are projected then, one matmul or
        convolution per layer, never the per-sample gradients.

        Args:
            direction: ``{parameter name: tensor shaped like the parameter}``;
                parameters left out count as zero.

        Returns:
            ``[N]`` projections, or ``None`` when nothing was kept or a kept tensor was
            changed in place since the pass (e.g. an input that is a parameter the
            optimizer updated) — the caller must then use another method.

        Example:
            >>> import torch
            >>> from cockpit import Engine
            >>> from cockpit.quantities import BatchL2
            >>> _ = torch.manual_seed(0)
            >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
            >>> x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()  # [N, ·]
            >>> with Engine(model, loss_fn) as engine:
            ...     loss = loss_fn(model(x), y)
            ...     with engine.gather([BatchL2()], keep_factors=True) as result:
            ...         loss.backward()
            >>> u = {"weight": torch.randn(2, 3).double(), "bias": torch.randn(2).double()}
            >>> r = 2 * (model(x) - y).detach()  # [N, 2]: ∂l_n/∂f_n
            >>> expected = (r * (x @ u["weight"].T + u["bias"])).sum(1)  # [N]: ⟨g_n, u⟩
            >>> torch.allclose(result.project(u), expected)
            True
            >>> result.release(); result.project(u) is None
            True
        """
        if not self.kept:
            return None
        total = None
        for name, (factor, param, versions) in self.kept.items():
            if any(getattr(factor, k)._version != v for k, v in versions.items()):
                return None
            u = direction.get(name)
            if u is None:
                continue
            q = Projection("__kept__")
            with torch.no_grad():
                part = factor.reduce([q], param, {q.key: u})[q]
            total = part if total is None else total + part
        if total is None:  # the direction is zero on every kept parameter
            _, param, _ = next(iter(self.kept.values()))
            return param.new_zeros(self.batch_size)
        return total

    def release(self) -> None:
        """Drop the kept factors (their tensors are freed with them).

        Example:
            >>> import torch
            >>> from cockpit import Engine
            >>> from cockpit.quantities import BatchL2
            >>> model = torch.nn.Linear(3, 2)
            >>> with Engine(model, torch.nn.MSELoss()) as engine:
            ...     loss = torch.nn.MSELoss()(model(torch.randn(4, 3)), torch.randn(4, 2))
            ...     with engine.gather([BatchL2()], keep_factors=True) as result:
            ...         loss.backward()
            >>> sorted(result.kept)  # per parameter: (factor, value, tensor versions)
            ['bias', 'weight']
            >>> result.release(); result.kept
            {}
        """
        self.kept = {}

    def __getitem__(self, quantity: Quantity) -> dict[str, Tensor]:
        """Return ``{parameter name: tensor}`` for a gathered quantity."""
        try:
            return self.per_param[quantity]
        except KeyError:
            raise KeyError(
                f"{quantity!r} was not gathered; gathered: {sorted(map(repr, self.per_param))}"
            ) from None

    def __contains__(self, quantity: object) -> bool:
        return quantity in self.per_param

    def total(self, quantity: Quantity) -> Tensor:
        """Model-wide value: the sum over parameter tensors (the trace for diagonals).

        Raises:
            ValueError: For quantities without a model-wide total (second moment,
                individual gradients), whose per-parameter shapes differ.
        """
        if quantity.total_mode not in ("sum", "trace"):
            raise ValueError(f"{quantity!r} has no model-wide total; use per-parameter values")
        values = list(self[quantity].values())
        if not values:
            raise ValueError(f"{quantity!r}: no parameter contributed to this backward pass")
        if quantity.total_mode == "trace":
            return torch.stack([v.sum() for v in values]).sum()
        out = values[0].clone()
        for v in values[1:]:
            out += v
        return out


def variance(
    second_moment: Mapping[str, Tensor] | Tensor, mean: Mapping[str, Tensor] | Tensor, n: int
) -> Mapping[str, Tensor] | Tensor:
    """Biased variance ``second_moment / N - mean²`` of the individual gradients.

    Args:
        second_moment: ``Σ_n g_n²`` (a tensor or a dict of tensors).
        mean: Mean gradient ``(1/N) Σ_n g_n`` shaped alike.
        n: Batch size N.

    Returns:
        The biased (1/N) variance per coordinate; multiply by ``N / (N - 1)`` for the
        unbiased one.

    Example:
        >>> import torch
        >>> g = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
        >>> variance((g**2).sum(0), g.mean(0), 2)
        tensor([1., 0.])
    """
    if isinstance(second_moment, Tensor):
        return second_moment / n - mean**2
    return {k: second_moment[k] / n - mean[k] ** 2 for k in second_moment}
