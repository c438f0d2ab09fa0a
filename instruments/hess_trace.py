"""``hess_trace``: the trace of the mini-batch Hessian (or GGN), model-wide and per tensor."""

from __future__ import annotations

from cockpit.quantities import DiagGGN, DiagHessian, Quantity
from instruments.base import Instrument, PanelSpec, Record, Scalar, StepContext, register_instrument

__all__ = ["HessTrace", "curvature_quantity"]


def curvature_quantity(curvature: str) -> Quantity:
    """Diagonal-curvature key: ``"hessian"`` (exact where provable), ``"ggn"`` or ``"ggn_mc"``.

    Example:
        >>> from instruments.hess_trace import curvature_quantity
        >>> curvature_quantity("ggn"), curvature_quantity("ggn_mc")
        (DiagGGN(mc_samples=0), DiagGGN(mc_samples=1))
        >>> curvature_quantity("hessian").probes  # Hutchinson probes if it cannot be exact
        64
    """
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

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["hess_trace"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> a = torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: the Hessian is (2/N) aᵀa
        >>> abs(latest["hess_trace"] - float(2 / 32 * a.pow(2).sum())) < 1e-9
        True
        >>> latest["hess_trace.exact"]  # 1: the exact diagonal (linear model, MSE)
        1.0
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
