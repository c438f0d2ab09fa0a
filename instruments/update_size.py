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
    """``‖θ_{t+1} − θ_t‖`` for any optimizer (belongs to step t), model-wide and per tensor.

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> seen = []
        >>> with Cockpit(model, loss_fn, opt, ["update_size", "grad_norm"]) as cockpit:
        ...     for step in range(1):
        ...         opt.zero_grad()
        ...         loss = loss_fn(model(x), y)
        ...         with cockpit.step(step, loss):
        ...             loss.backward()
        ...         opt.step()
        ...         seen.append(cockpit.latest())
        >>> after = seen[0]  # plain SGD: ‖Δθ‖ = lr · ‖∇L‖
        >>> abs(after["update_size"] - 0.1 * after["grad_norm"]) < 1e-12
        True
    """

    name = "update_size"
    cost = "free"
    needs_update = True
    panel = PanelSpec(
        "line", "step_size", "Update size", y_log=True, description="How large are the steps?"
    )

    def on_update(self, ctx: StepContext, update: Update) -> list[Record]:  # noqa: D102
        return _norms(ctx.step, self.name, update.delta)
