"""``distance``: how far the parameters moved from their initial values."""

from __future__ import annotations

from instruments.base import Instrument, PanelSpec, Record, StepContext, register_instrument
from instruments.base import norms as _norms


@register_instrument
class Distance(Instrument):
    """``‖θ_t − θ_0‖``, model-wide and per tensor (θ_0: parameters when the Cockpit was created)."""

    name = "distance"
    cost = "free"
    panel = PanelSpec(
        "line",
        "step_size",
        "Distance from init",
        description="How far did training move the weights?",
    )

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        diff = {k: p - ctx.initial_params[k] for k, p in ctx.params.items()}
        return _norms(ctx.step, self.name, diff)
