"""``hyperparameters``: learning rate, momentum/betas and weight decay per group, batch size."""

from __future__ import annotations

from instruments.base import Instrument, PanelSpec, Record, Scalar, StepContext, register_instrument


@register_instrument
class Hyperparameters(Instrument):
    """Optimizer hyperparameters per parameter group (``param="group<i>"``) and the batch size.

    Metrics: ``lr``, ``momentum``, ``beta1``, ``beta2``, ``weight_decay`` (those present in the
    group) and ``batch_size`` (``param="all"``).

    Example:
        >>> import tempfile
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from cockpit.logreader import read_log
        >>> model, loss_fn = torch.nn.Linear(3, 1), torch.nn.MSELoss()
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with Cockpit(model, loss_fn, opt, ["hyperparameters"], logdir=tmp) as cockpit:
        ...         loss = loss_fn(model(x), y)
        ...         with cockpit.step(0, loss):
        ...             loss.backward()
        ...     rows = read_log(tmp, instruments="hyperparameters")
        >>> for metric, param, value in zip(rows.metric, rows.param, rows.value):
        ...     print(metric, param, value)
        batch_size all 16.0
        lr group0 0.001
        weight_decay group0 0.01
        eps group0 1e-08
        beta1 group0 0.9
        beta2 group0 0.999
    """

    name = "hyperparameters"
    cost = "free"
    panel = PanelSpec(
        "hyperparameters",
        "hyperparameters",
        "Hyperparameters",
        metrics=("lr",),
        description="What did the optimizer use?",
    )

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        rows: list[Record] = [
            Scalar(ctx.step, self.name, "batch_size", "all", float(ctx.batch_size))
        ]
        for i, group in enumerate(ctx.optimizer.param_groups):
            values = {}
            for key in ("lr", "momentum", "weight_decay", "alpha", "eps"):
                if key in group and isinstance(group[key], (int, float)):
                    values[key] = group[key]
            if "betas" in group:
                values["beta1"], values["beta2"] = group["betas"][:2]
            for key, v in values.items():
                rows.append(Scalar(ctx.step, self.name, key, f"group{i}", float(v)))
        return rows
