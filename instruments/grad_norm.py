"""``grad_norm``: the norm of the mini-batch gradient, model-wide and per tensor."""

from __future__ import annotations

from instruments.base import Instrument, PanelSpec, Record, StepContext, register_instrument
from instruments.base import norms as _norms


@register_instrument
class GradNorm(Instrument):
    """``‖∇L‖`` (the gradient the optimizer sees), model-wide and per parameter tensor."""

    name = "grad_norm"
    cost = "free"
    panel = PanelSpec(
        "line", "step_size", "Gradient norm", y_log=True, description="How steep is the loss?"
    )

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        return _norms(ctx.step, self.name, ctx.grads)
