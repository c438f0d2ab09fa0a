"""``distance``: how far the parameters moved from their initial values."""

from __future__ import annotations

from instruments.base import (
    Instrument,
    PanelSpec,
    Record,
    StepContext,
    differences,
    register_instrument,
)
from instruments.base import norms as _norms


@register_instrument
class Distance(Instrument):
    """``‖θ_t − θ_0‖``, model-wide and per tensor (θ_0: parameters when the Cockpit was created).

    Example:
        >>> import torch
        >>> from cockpit import Cockpit
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> seen = []
        >>> with Cockpit(model, loss_fn, opt, ["distance", "update_size"]) as cockpit:
        ...     for step in range(2):
        ...         opt.zero_grad()
        ...         loss = loss_fn(model(x), y)
        ...         with cockpit.step(step, loss):
        ...             loss.backward()
        ...         opt.step()
        ...         seen.append(cockpit.latest())
        >>> seen[0]["distance"]  # step 0 starts at θ_0
        0.0
        >>> abs(seen[1]["distance"] - seen[0]["update_size"]) < 1e-12  # ‖θ_1 − θ_0‖ = ‖Δθ_0‖
        True
    """

    name = "distance"
    cost = "free"
    panel = PanelSpec(
        "line",
        "step_size",
        "Distance from init",
        description="How far did training move the weights?",
    )

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        diff = differences(ctx.params, {k: ctx.initial_params[k] for k in ctx.params})
        return _norms(ctx.step, self.name, diff)
