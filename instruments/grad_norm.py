"""``grad_norm``: the norm of the mini-batch gradient, model-wide and per tensor."""

from __future__ import annotations

from instruments.base import Instrument, PanelSpec, Record, StepContext, register_instrument
from instruments.base import norms as _norms


@register_instrument
class GradNorm(Instrument):
    """``‖∇L‖`` (the gradient the optimizer sees), model-wide and per parameter tensor.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with Cockpit(model, loss_fn, opt, ["grad_norm"]) as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     with cockpit.step(0, loss):
        ...         loss.backward()
        >>> latest = cockpit.latest()
        >>> grad = torch.cat([p.grad.flatten() for p in model.parameters()])  # [D]
        >>> abs(latest["grad_norm"] - float(grad.norm())) < 1e-12
        True
    """

    name = "grad_norm"
    cost = "free"
    panel = PanelSpec(
        "line", "step_size", "Gradient norm", y_log=True, description="How steep is the loss?"
    )

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        return _norms(ctx.step, self.name, ctx.grads)
