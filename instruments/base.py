"""The instrument protocol: what an instrument asks for, computes and shows.

An :class:`Instrument` declares the engine quantities it needs (``requires``), a
schedule, and how it is drawn (``panel``, read by the dashboard, so adding an
instrument needs no app code). Every tracked step the Cockpit merges the requests of
all active instruments, runs the engine once, and calls :meth:`Instrument.compute`
with a :class:`StepContext`. Instruments that need the actual update
``θ_{t+1} − θ_t`` also get :meth:`Instrument.on_update` right after
``optimizer.step()``.

Instruments never import Dash or Plotly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cockpit.quantities import Gathered, Quantity

__all__ = [
    "squared_norm",
    "Instrument",
    "PanelSpec",
    "Plan",
    "Scalar",
    "Histogram",
    "Record",
    "StepContext",
    "Update",
    "register_instrument",
    "INSTRUMENTS",
    "norms",
    "second_moment_rows",
]


@dataclass(frozen=True)
class PanelSpec:
    """How the dashboard shows an instrument.

    Attributes:
        kind: ``"line"``, ``"hist1d"``, ``"hist2d"``, ``"alpha"``, ``"gradient_tests"``,
            ``"hyperparameters"`` or ``"performance"``.
        group: ``"step_size"``, ``"gradients"``, ``"curvature"``,
            ``"hyperparameters"`` or ``"performance"`` (the Cockpit view's sections).
        title: Panel title.
        metrics: Metric names plotted (default: the instrument name).
        y_log: Log scale by default.
        description: One sentence: the question the panel answers.

    Example:
        >>> from instruments import INSTRUMENTS, PanelSpec
        >>> INSTRUMENTS["grad_norm"].panel.kind, INSTRUMENTS["grad_norm"].panel.group
        ('line', 'step_size')
        >>> PanelSpec("line", "gradients", "Largest individual gradient", y_log=True).metrics
        ()
    """

    kind: str
    group: str
    title: str
    metrics: tuple[str, ...] = ()
    y_log: bool = False
    description: str = ""


@dataclass
class Scalar:
    """One scalar log row (``param="all"`` for model-wide values).

    Example:
        What :meth:`Instrument.compute` and :meth:`Instrument.on_update` return; the
        Cockpit writes each as one row of the ``scalars`` table:

        >>> from instruments.base import Scalar
        >>> Scalar(step=3, instrument="cabs", metric="lr_eff", param="all", value=0.1)
        Scalar(step=3, instrument='cabs', metric='lr_eff', param='all', value=0.1)
    """

    step: int
    instrument: str
    metric: str
    param: str
    value: float


@dataclass
class Histogram:
    """One histogram log row: ``counts`` ``[B]`` or ``[B_g, B_θ]`` and the bin edges.

    Example:
        >>> import torch
        >>> from instruments.base import Histogram
        >>> from instruments.histograms import hist_1d
        >>> counts, edges = hist_1d(torch.tensor([-3.0, 0.1, 0.2, 5.0]), bins=4)
        >>> row = Histogram(0, "grad_hist_1d", "all", counts, (edges,))  # [B], ([B + 1],)
        >>> row.counts.tolist(), row.edges[0].tolist()  # outliers land in the edge bins
        ([1.0, 0.0, 2.0, 1.0], [-2.0, -1.0, 0.0, 1.0, 2.0])
    """

    step: int
    instrument: str
    param: str
    counts: Tensor
    edges: tuple[Tensor, ...]


Record = Scalar | Histogram


@dataclass
class Plan:
    """What an instrument needs on one step.

    Attributes:
        quantities: Engine quantities.
        directions: Projection directions ``{key: {param name: tensor}}``.
        individual_losses: Needs the per-sample losses ``l_n``.
        update: Wants :meth:`Instrument.on_update` after ``optimizer.step()``.
        output_grad: Needs the gradient w.r.t. the model output (start-point
            projections onto the update, see :meth:`StepContext.directional_derivatives`).

    Example:
        >>> from cockpit import schedules
        >>> from instruments import get
        >>> norm_test = get("norm_test", schedules.every(10))
        >>> plan = norm_test.plan(20)
        >>> sorted(map(repr, plan.quantities)), plan.update, plan.individual_losses
        (['BatchL2()', 'GradDot()'], False, False)
        >>> norm_test.plan(5) is None  # not scheduled: idle
        True
        >>> get("alpha").plan(0) is None  # no schedule yet (the Cockpit assigns its default)
        True
    """

    quantities: frozenset[Quantity] = frozenset()
    directions: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    individual_losses: bool = False
    update: bool = False
    output_grad: bool = False


class StepContext:
    """What instruments see on a tracked step (all tensors detached).

    Attributes:
        step: The step index.
        batch_size: N.
        reduction: ``"mean"`` or ``"sum"``.
        loss: The batch loss L.
        gathered: The engine's :class:`~cockpit.quantities.Gathered`, or None.
        params: ``{name: θ_t}`` (trainable parameters, at the start of the step).
        grads: ``{name: ∇L}`` as the optimizer sees it.
        initial_params: ``{name: θ_0}``.
        optimizer: The optimizer.
        individual_losses: ``[N]`` or None when not requested.

    Example:
        An instrument that keeps what it sees, and the per-sample projections onto the
        descent direction (float64 for exact comparisons):

        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments import Instrument
        >>> from instruments.base import Plan
        >>> class Peek(Instrument):
        ...     name = "peek"
        ...     def plan(self, step):  # projections need the model output's gradient
        ...         return Plan(update=True, output_grad=True)
        ...     def on_update(self, ctx, update):
        ...         u = {k: -g for k, g in ctx.mean_grads.items()}  # descent direction
        ...         self.seen = ctx, ctx.directional_derivatives(u)  # [N]: ⟨g_n, u⟩
        ...         return []
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.CrossEntropyLoss()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3).double(), torch.randint(0, 2, (8,))
        >>> peek = Peek()
        >>> with Cockpit(model, loss_fn, opt, [peek]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        ...     opt.step()
        >>> ctx, proj = peek.seen
        >>> ctx.step, ctx.batch_size, ctx.reduction, sorted(ctx.grads)
        (0, 8, 'mean', ['bias', 'weight'])
        >>> mean_sq = sum(float(g.pow(2).sum()) for g in ctx.mean_grads.values())
        >>> proj.shape, abs(float(proj.mean()) + mean_sq) < 1e-12  # mean ⟨g_n, -ḡ⟩ = -‖ḡ‖²
        (torch.Size([8]), True)
    """

    def __init__(self, **kwargs: Any) -> None:
        self.individual_losses: Tensor | None = None
        self.gathered: Gathered | None = None
        self._directional: Callable[[dict[str, Tensor]], Tensor] | None = None
        self._update_directional: Callable[[], Tensor] | None = None
        for k, v in kwargs.items():
            setattr(self, k, v)

    @property
    def mean_grads(self) -> dict[str, Tensor]:
        """``ḡ = (1/N) Σ_n g_n`` per parameter (``∇L`` for mean, ``∇L / N`` for sum)."""
        if self.reduction == "mean":
            return self.grads
        return {k: g / self.batch_size for k, g in self.grads.items()}

    def directional_derivatives(self, direction: dict[str, Tensor]) -> Tensor:
        """Per-sample ``⟨g_n, u⟩`` at θ_t on this step's batch (available in ``on_update``)."""
        if self._directional is None:
            raise RuntimeError("directional derivatives need Plan(output_grad=True)")
        return self._directional(direction)

    def update_derivatives(self, update: Update) -> Tensor:
        """Per-sample ``⟨g_n, Δθ⟩ / ‖Δθ‖`` at θ_t for this step's own update.

        The same as :meth:`directional_derivatives` of ``Δθ / ‖Δθ‖``; for
        ``torch.optim.SGD`` the cockpit can read it off projections gathered in the
        backward pass (:mod:`cockpit.sgd_update`) instead of projecting afterwards.

        Example:
            >>> import torch
            >>> from cockpit import Cockpit
            >>> from instruments import Instrument
            >>> from instruments.base import Plan
            >>> class Slope(Instrument):  # per-sample slopes along the step taken
            ...     name = "slope"
            ...     def plan(self, step):
            ...         return Plan(update=True, output_grad=True)
            ...     def on_update(self, ctx, update):
            ...         self.fast = ctx.update_derivatives(update)
            ...         u = {k: d / update.norm for k, d in update.delta.items()}
            ...         self.slow = ctx.directional_derivatives(u)
            ...         return []
            >>> _ = torch.manual_seed(0)
            >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss()
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> x, y = torch.randn(8, 3).double(), torch.randn(8, 2).double()
            >>> slope = Slope()
            >>> with Cockpit(model, loss_fn, opt, [slope]) as cockpit:
            ...     loss = loss_fn(model(x), y)
            ...     with cockpit.step(0, loss):
            ...         loss.backward()
            ...     opt.step()
            >>> slope.fast.shape, torch.allclose(slope.fast, slope.slow)
            (torch.Size([8]), True)
        """
        if update.norm == 0.0:
            raise ValueError("the update is zero: it has no direction")
        fast = getattr(self, "_update_directional", None)
        if fast is not None:
            return fast() / update.norm
        return self.directional_derivatives({k: d / update.norm for k, d in update.delta.items()})


@dataclass
class Update:
    """The actual update of one optimizer step: ``{name: θ_{t+1} − θ_t}`` and its norm.

    Example:
        Plain SGD steps ``−lr · ∇L``:

        >>> import torch
        >>> from cockpit import Cockpit
        >>> from instruments import Instrument
        >>> class Keep(Instrument):
        ...     name, needs_update = "keep", True
        ...     def on_update(self, ctx, update):  # after optimizer.step()
        ...         self.update, self.grads = update, ctx.grads
        ...         return []
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2), torch.nn.MSELoss()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> keep = Keep()
        >>> with Cockpit(model, loss_fn, opt, [keep]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        ...     opt.step()
        >>> delta = keep.update.delta  # {name: [*P]}
        >>> torch.allclose(delta["weight"], -0.1 * keep.grads["weight"])
        True
        >>> norm = torch.cat([d.flatten() for d in delta.values()]).norm()
        >>> abs(keep.update.norm - float(norm)) < 1e-6
        True
    """

    delta: dict[str, Tensor]
    norm: float


class Instrument:
    """Base class of all instruments.

    Subclasses set ``name``, ``requires`` and ``panel`` and implement :meth:`compute`
    (and :meth:`on_update` if ``needs_update``). The default :meth:`plan` asks for
    ``requires`` on scheduled steps.

    Args:
        schedule: ``step -> bool``; None uses the Cockpit's default schedule.

    Example:
        An instrument that needs the update: the step length per unit gradient, which is
        the learning rate for plain SGD.

        >>> import torch
        >>> from cockpit import Cockpit, schedules
        >>> from instruments import Instrument, PanelSpec
        >>> from instruments.base import Scalar
        >>> class StepPerGrad(Instrument):  # ‖θ_{t+1} − θ_t‖ / ‖∇L‖
        ...     name = "step_per_grad"
        ...     needs_update = True
        ...     panel = PanelSpec("line", "step_size", "Step per gradient", y_log=True)
        ...     def compute(self, ctx):  # after the backward pass
        ...         self.grad_norm = sum(float(g.pow(2).sum()) for g in ctx.grads.values()) ** 0.5
        ...         return []
        ...     def on_update(self, ctx, update):  # after optimizer.step()
        ...         value = update.norm / self.grad_norm
        ...         return [Scalar(ctx.step, self.name, self.name, "all", value)]
        >>> inst = StepPerGrad(schedules.every(2))
        >>> inst.plan(1) is None, inst.plan(2).update
        (True, True)
        >>> inst.config()
        {'name': 'step_per_grad', 'schedule': {'kind': 'every', 'k': 2, 'offset': 0}}
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2), torch.nn.CrossEntropyLoss()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> with Cockpit(model, loss_fn, opt, [inst]) as cockpit:
        ...     for step in range(2):
        ...         opt.zero_grad()
        ...         loss = loss_fn(model(x), y)
        ...         with cockpit.step(step, loss):
        ...             loss.backward()
        ...         opt.step()
        >>> round(cockpit.latest()["step_per_grad"], 5)
        0.1
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[Quantity]] = frozenset()
    needs_update: ClassVar[bool] = False
    needs_individual_losses: ClassVar[bool] = False
    panel: ClassVar[PanelSpec | None] = None
    #: Cost class for the docs: "free", "first-order", "curvature" or "HVP".
    cost: ClassVar[str] = "free"

    def __init__(self, schedule: Callable[[int], bool] | None = None) -> None:
        self.schedule = schedule

    def plan(self, step: int) -> Plan | None:
        """What this instrument needs on ``step``, or None when it is idle.

        Args:
            step: The step index.

        Returns:
            The :class:`Plan` (by default: ``requires``, the individual losses if
            ``needs_individual_losses``, the update if ``needs_update``) on scheduled
            steps, else None.
        """
        if self.schedule is None or not self.schedule(step):
            return None
        return Plan(
            quantities=frozenset(self.requires),
            individual_losses=self.needs_individual_losses,
            update=self.needs_update,
        )

    def compute(self, ctx: StepContext) -> list[Record]:
        """Records for a tracked step (after the backward pass).

        Args:
            ctx: What the step gathered.

        Returns:
            :class:`Scalar` and :class:`Histogram` rows (the default: none).
        """
        return []

    def on_update(self, ctx: StepContext, update: Update) -> list[Record]:
        """Records that need the actual update (called after ``optimizer.step()``).

        Args:
            ctx: The context of the step that :meth:`compute` saw.
            update: ``θ_{t+1} − θ_t`` and its norm.

        Returns:
            :class:`Scalar` and :class:`Histogram` rows (the default: none).
        """
        return []

    def config(self) -> dict[str, Any]:
        """JSON-serializable configuration for the run metadata."""
        sched = getattr(self.schedule, "config", repr(self.schedule))
        return {"name": self.name, "schedule": sched}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r})"


INSTRUMENTS: dict[str, type[Instrument]] = {}


def register_instrument(cls: type[Instrument]) -> type[Instrument]:
    """Class decorator adding an instrument to :data:`INSTRUMENTS` under ``cls.name``.

    Registered instruments can be named in ``Cockpit(instruments=[...])`` and get
    dashboard panels from their ``panel``.

    Args:
        cls: The :class:`Instrument` subclass (its ``name`` is the log name).

    Returns:
        ``cls``.

    Raises:
        ValueError: If ``cls`` has no name or another class has the name.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from cockpit.quantities import BatchL2
        >>> from instruments import INSTRUMENTS, Instrument, register_instrument
        >>> from instruments.base import Scalar
        >>> @register_instrument
        ... class MaxSampleNorm(Instrument):  # the largest individual-gradient norm
        ...     name = "max_sample_norm"
        ...     requires = frozenset({BatchL2()})
        ...     cost = "first-order"
        ...     def compute(self, ctx):
        ...         l2 = ctx.gathered.total(BatchL2())  # [N]: ‖g_n‖² over all parameters
        ...         return [Scalar(ctx.step, self.name, self.name, "all", float(l2.max().sqrt()))]
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2), torch.nn.CrossEntropyLoss()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> with Cockpit(model, loss_fn, opt, ["max_sample_norm", "grad_norm"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> latest["max_sample_norm"] >= latest["grad_norm"]  # ‖mean‖ ≤ max ‖g_n‖
        True
        >>> del INSTRUMENTS["max_sample_norm"]  # (keep the registry as it was)
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in INSTRUMENTS and INSTRUMENTS[cls.name] is not cls:
        raise ValueError(f"an instrument named {cls.name!r} exists: {INSTRUMENTS[cls.name]}")
    INSTRUMENTS[cls.name] = cls
    return cls


def _norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The accumulation dtype of a norm: float32 and float64 their own, lower ones float32.

    Torch reduces a float32 norm pairwise (relative error about 1e-7 at a million
    entries, measured 4e-7 on 3C3D's gradient); asking for float64 converts every entry
    first and took 4x as long (0.51 ms against 0.13 ms for 3C3D's 0.9M parameters).
    """
    return None if dtype in (torch.float32, torch.float64) else torch.float32


def squared_norm(t: Tensor) -> float:
    """``‖t‖²`` as a Python float, accumulated in ``t``'s precision (float32 at least).

    Example:
        >>> import torch
        >>> squared_norm(torch.tensor([[3.0], [4.0]]))
        25.0
    """
    return float(torch.linalg.vector_norm(t, dtype=_norm_dtype(t.dtype))) ** 2


def host_floats(values: Sequence[Tensor]) -> list[float]:
    """Python floats of scalar tensors, one device→host copy per device.

    ``float(t)`` per tensor waits for a GPU once per value; an instrument that reports
    one number per parameter tensor would stall the device dozens of times a step.
    Values are converted to float64 on their device first.

    Example:
        >>> import torch
        >>> host_floats([torch.tensor(1.5), torch.tensor([2.0]), torch.tensor(3)])
        [1.5, 2.0, 3.0]
    """
    groups: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v.device, []).append(i)
    out = [0.0] * len(values)
    with torch.no_grad():
        for idx in groups.values():
            parts = [values[i] if values[i].dim() == 0 else values[i].reshape(()) for i in idx]
            stacked = torch.stack(parts).to(torch.float64)  # stack promotes mixed dtypes
            for i, v in zip(idx, stacked.tolist(), strict=True):
                out[i] = v
    return out


def host_arrays(values: Sequence[Tensor]) -> list[np.ndarray]:
    """NumPy arrays of tensors, one device→host copy per device, dtype and shape.

    A step's histograms (model-wide and one per parameter tensor) would otherwise
    wait for a GPU once each. CPU tensors are returned as views, not copied.

    Example:
        >>> import torch
        >>> [a.tolist() for a in host_arrays([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])]
        [[1.0, 2.0], [3.0, 4.0]]
    """
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault((v.device, v.dtype, tuple(v.shape)), []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(values)
    with torch.no_grad():
        for (device, _, _), idx in groups.items():
            if device.type == "cpu":
                for i in idx:
                    out[i] = values[i].detach().numpy()
                continue
            stacked = torch.stack([values[i].detach() for i in idx]).cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = stacked[j]
    return out


def squared_norms(tensors: dict[str, Tensor]) -> dict[str, float]:
    """``{name: ‖t‖²}``, one fused norm kernel and one host copy per device/dtype.

    Each norm is accumulated in its tensor's precision (float32 at least, see
    :func:`squared_norm`) and squared in float64.

    Example:
        >>> import torch
        >>> squared_norms({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])})
        {'w': 25.0, 'b': 1.0}
    """
    names = list(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for k in names:
        groups.setdefault((tensors[k].device, tensors[k].dtype), []).append(k)
    norm_of: dict[str, Tensor] = {}
    with torch.no_grad():
        for keys in groups.values():
            ts = [tensors[k] for k in keys]
            acc = _norm_dtype(ts[0].dtype)
            try:  # the multi-tensor kernel clip_grad_norm_ uses
                found = torch._foreach_norm(ts, 2, dtype=acc)
            except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - older torch
                found = [torch.linalg.vector_norm(t, dtype=acc) for t in ts]
            norm_of.update(zip(keys, found, strict=True))
    values = host_floats([norm_of[k] for k in names])
    return {k: v * v for k, v in zip(names, values, strict=True)}


def differences(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{k: a[k] − b[k]}`` for the keys of ``b``, detached, in one fused kernel per device.

    Example:
        >>> import torch
        >>> differences({"w": torch.tensor([3.0]), "b": torch.tensor(1.0)}, {"w": torch.ones(1)})
        {'w': tensor([2.])}
    """
    keys = list(b)
    with torch.no_grad():
        left, right = [a[k] for k in keys], [b[k] for k in keys]
        try:
            found = torch._foreach_sub(left, right)
        except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - older torch
            found = [x - y for x, y in zip(left, right, strict=True)]
    return dict(zip(keys, found, strict=True))


def norms(step: int, instrument: str, tensors: dict[str, Tensor]) -> list[Record]:
    """Rows ``‖t‖`` per tensor and the model-wide norm (``param="all"``), summed in float64.

    Args:
        step: The step of the rows.
        instrument: The instrument (and metric) name.
        tensors: ``{param name: tensor}`` of any shapes.

    Returns:
        The model-wide row first, then one row per tensor.

    Example:
        >>> import torch
        >>> from instruments.base import norms
        >>> delta = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
        >>> rows = norms(7, "update_size", delta)
        >>> [(r.param, r.value) for r in rows]
        [('all', 5.0), ('w', 3.0), ('b', 4.0)]
    """
    squares = squared_norms(tensors)
    rows: list[Record] = [Scalar(step, instrument, instrument, "all", sum(squares.values()) ** 0.5)]
    rows += [Scalar(step, instrument, instrument, k, v**0.5) for k, v in squares.items()]
    return rows


def second_moment_rows(ctx: StepContext, instrument: str, fn) -> list[Record]:
    """Rows of ``fn(second_moment, mean_grad, N)`` model-wide and per tensor.

    ``fn`` takes one tensor or lists of tensors (one per parameter), as
    :func:`instruments.mean_gsnr.mean_gsnr` and :func:`instruments.early_stopping.early_stopping`.

    Args:
        ctx: A step context whose ``gathered`` holds :class:`~cockpit.quantities.SecondMoment`.
        instrument: The instrument (and metric) name.
        fn: ``fn(second_moment, mean_grad, N) -> float``.

    Returns:
        The model-wide row first, then one row per parameter tensor.

    Example:
        An instrument reporting the summed variance of the individual gradients:

        >>> import torch
        >>> from cockpit import Cockpit
        >>> from cockpit.quantities import SecondMoment
        >>> from instruments import Instrument
        >>> from instruments.base import second_moment_rows
        >>> def total_variance(m2, mean, n):  # tensors [*P], or lists of them (model-wide)
        ...     m2, mean = (v if isinstance(v, list) else [v] for v in (m2, mean))
        ...     return sum(float((s / n - g**2).sum()) for s, g in zip(m2, mean))
        >>> class TotalVariance(Instrument):
        ...     name, requires = "total_variance", frozenset({SecondMoment()})
        ...     def compute(self, ctx):
        ...         self.rows = second_moment_rows(ctx, self.name, total_variance)
        ...         return self.rows
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="sum")
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3).double(), torch.randn(8, 2).double()
        >>> inst = TotalVariance()
        >>> with Cockpit(model, loss_fn, opt, [inst]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> [r.param for r in inst.rows]
        ['all', 'weight', 'bias']
        >>> per_sample = [  # reference: one backward pass per sample
        ...     torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), model.weight)[0]
        ...     for i in range(8)
        ... ]
        >>> ref = float(torch.stack(per_sample).var(0, unbiased=False).sum())
        >>> abs(inst.rows[1].value - ref) < 1e-12
        True
    """
    from cockpit.quantities import SecondMoment

    assert ctx.gathered is not None
    sm, mean, n = ctx.gathered[SecondMoment()], ctx.mean_grads, ctx.batch_size
    keys = list(sm)
    total = fn([sm[k] for k in keys], [mean[k] for k in keys], n)
    rows: list[Record] = [Scalar(ctx.step, instrument, instrument, "all", total)]
    rows += [Scalar(ctx.step, instrument, instrument, k, fn(sm[k], mean[k], n)) for k in keys]
    return rows
