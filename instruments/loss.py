"""``loss``: the mini-batch loss L."""

from __future__ import annotations

from instruments.base import Instrument, PanelSpec, Record, Scalar, StepContext, register_instrument


@register_instrument
class Loss(Instrument):
    """The batch loss ``L`` as returned by the loss module.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["loss"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> latest["loss"] == float(loss.detach())
        True
    """

    name = "loss"
    cost = "free"
    panel = PanelSpec("performance", "performance", "Loss", description="Is the loss going down?")

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        return [Scalar(ctx.step, self.name, self.name, "all", ctx.loss)]
