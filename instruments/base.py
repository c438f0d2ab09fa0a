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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from cockpit.quantities import Gathered, Quantity

__all__ = [
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
    """

    kind: str
    group: str
    title: str
    metrics: tuple[str, ...] = ()
    y_log: bool = False
    description: str = ""


@dataclass
class Scalar:
    """One scalar log row (``param="all"`` for model-wide values)."""

    step: int
    instrument: str
    metric: str
    param: str
    value: float


@dataclass
class Histogram:
    """One histogram log row: ``counts`` ``[B]`` or ``[B_g, B_θ]`` and the bin edges."""

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
    """

    def __init__(self, **kwargs: Any) -> None:
        self.individual_losses: Tensor | None = None
        self.gathered: Gathered | None = None
        self._directional: Callable[[dict[str, Tensor]], Tensor] | None = None
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


@dataclass
class Update:
    """The actual update of one optimizer step: ``{name: θ_{t+1} − θ_t}`` and its norm."""

    delta: dict[str, Tensor]
    norm: float


class Instrument:
    """Base class of all instruments.

    Subclasses set ``name``, ``requires`` and ``panel`` and implement :meth:`compute`
    (and :meth:`on_update` if ``needs_update``). The default :meth:`plan` asks for
    ``requires`` on scheduled steps.

    Args:
        schedule: ``step -> bool``; None uses the Cockpit's default schedule.
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
        """What this instrument needs on ``step``, or None when it is idle."""
        if self.schedule is None or not self.schedule(step):
            return None
        return Plan(
            quantities=frozenset(self.requires),
            individual_losses=self.needs_individual_losses,
            update=self.needs_update,
        )

    def compute(self, ctx: StepContext) -> list[Record]:
        """Records for a tracked step (after the backward pass)."""
        return []

    def on_update(self, ctx: StepContext, update: Update) -> list[Record]:
        """Records that need the actual update (called after ``optimizer.step()``)."""
        return []

    def config(self) -> dict[str, Any]:
        """JSON-serializable configuration for the run metadata."""
        sched = getattr(self.schedule, "config", repr(self.schedule))
        return {"name": self.name, "schedule": sched}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r})"


INSTRUMENTS: dict[str, type[Instrument]] = {}


def register_instrument(cls: type[Instrument]) -> type[Instrument]:
    """Class decorator adding an instrument to :data:`INSTRUMENTS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in INSTRUMENTS and INSTRUMENTS[cls.name] is not cls:
        raise ValueError(f"an instrument named {cls.name!r} exists: {INSTRUMENTS[cls.name]}")
    INSTRUMENTS[cls.name] = cls
    return cls


def norms(step: int, instrument: str, tensors: dict[str, Tensor]) -> list[Record]:
    """Rows ``‖t‖`` per tensor and the model-wide norm (``param="all"``), in float64."""
    squares = {k: float(t.double().pow(2).sum()) for k, t in tensors.items()}
    rows: list[Record] = [Scalar(step, instrument, instrument, "all", sum(squares.values()) ** 0.5)]
    rows += [Scalar(step, instrument, instrument, k, v**0.5) for k, v in squares.items()]
    return rows


def second_moment_rows(ctx: StepContext, instrument: str, fn) -> list[Record]:
    """Rows of ``fn(second_moment, mean_grad, N)`` model-wide and per tensor.

    ``fn`` takes one tensor or lists of tensors (one per parameter), as
    :func:`instruments.mean_gsnr.mean_gsnr` and :func:`instruments.early_stopping.early_stopping`.
    """
    from cockpit.quantities import SecondMoment

    assert ctx.gathered is not None
    sm, mean, n = ctx.gathered[SecondMoment()], ctx.mean_grads, ctx.batch_size
    keys = list(sm)
    total = fn([sm[k] for k in keys], [mean[k] for k in keys], n)
    rows: list[Record] = [Scalar(ctx.step, instrument, instrument, "all", total)]
    rows += [Scalar(ctx.step, instrument, instrument, k, fn(sm[k], mean[k], n)) for k in keys]
    return rows
