"""``update_size``: the length of the actual optimizer step."""

from __future__ import annotations

from instruments.base import (
    Instrument,
    PanelSpec,
    Record,
    StepContext,
    Update,
    register_instrument,
)
from instruments.base import norms as _norms


@register_instrument
class UpdateSize(Instrument):
    """``‖θ_{t+1} − θ_t‖`` for any optimizer (belongs to step t), model-wide and per tensor."""

    name = "update_size"
    cost = "free"
    needs_update = True
    panel = PanelSpec(
        "line", "step_size", "Update size", y_log=True, description="How large are the steps?"
    )

    def on_update(self, ctx: StepContext, update: Update) -> list[Record]:  # noqa: D102
        return _norms(ctx.step, self.name, update.delta)
