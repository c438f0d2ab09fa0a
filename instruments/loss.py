"""``loss``: the mini-batch loss L."""

from __future__ import annotations

from instruments.base import Instrument, PanelSpec, Record, Scalar, StepContext, register_instrument


@register_instrument
class Loss(Instrument):
    """The batch loss ``L`` as returned by the loss module."""

    name = "loss"
    cost = "free"
    panel = PanelSpec("performance", "performance", "Loss", description="Is the loss going down?")

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        return [Scalar(ctx.step, self.name, self.name, "all", ctx.loss)]
