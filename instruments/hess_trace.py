"""``hess_trace``: the trace of the mini-batch Hessian (or GGN), model-wide and per tensor."""

from __future__ import annotations

from cockpit.quantities import DiagGGN, DiagHessian, Quantity
from instruments.base import Instrument, PanelSpec, Record, Scalar, StepContext, register_instrument

__all__ = ["HessTrace", "curvature_quantity"]


def curvature_quantity(curvature: str) -> Quantity:
    """Diagonal-curvature key: ``"hessian"`` (exact where provable), ``"ggn"`` or ``"ggn_mc"``."""
    choices = {"hessian": DiagHessian(), "ggn": DiagGGN(0), "ggn_mc": DiagGGN(1)}
    if curvature not in choices:
        raise ValueError(f"curvature must be one of {sorted(choices)}, got {curvature!r}")
    return choices[curvature]


@register_instrument
class HessTrace(Instrument):
    """``Σ_j h_j`` of the diagonal curvature of the batch loss L.

    Args:
        schedule: Step predicate.
        curvature: ``"hessian"`` (default; the exact diagonal Hessian where the engine
            can prove it, else a Hutchinson estimate with a warning), ``"ggn"`` (exact
            diagonal GGN) or ``"ggn_mc"`` (Monte-Carlo GGN, one sample).

    Metrics: ``hess_trace`` (model-wide and per tensor) and ``exact`` (1 when the
    diagonal was exact, 0 for a Hutchinson or Monte-Carlo estimate).
    """

    name = "hess_trace"
    cost = "curvature"
    panel = PanelSpec("line", "curvature", "Hessian trace", description="How curved is the loss?")

    def __init__(self, schedule=None, curvature: str = "hessian") -> None:
        super().__init__(schedule)
        self.curvature = curvature
        self.quantity = curvature_quantity(curvature)
        self.requires = frozenset({self.quantity})

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        assert ctx.gathered is not None
        diag = ctx.gathered[self.quantity]
        traces = {k: float(v.double().sum()) for k, v in diag.items()}
        exact = float(bool(ctx.gathered.exact.get(self.quantity, False)))
        rows: list[Record] = [
            Scalar(ctx.step, self.name, self.name, "all", sum(traces.values())),
            Scalar(ctx.step, self.name, "exact", "all", exact),
        ]
        rows += [Scalar(ctx.step, self.name, self.name, k, v) for k, v in traces.items()]
        return rows

    def config(self) -> dict:  # noqa: D102
        return {**super().config(), "curvature": self.curvature}
