"""``hyperparameters``: learning rate, momentum/betas and weight decay per group, batch size."""

from __future__ import annotations

from instruments.base import Instrument, PanelSpec, Record, Scalar, StepContext, register_instrument


@register_instrument
class Hyperparameters(Instrument):
    """Optimizer hyperparameters per parameter group (``param="group<i>"``) and the batch size.

    Metrics: ``lr``, ``momentum``, ``beta1``, ``beta2``, ``weight_decay`` (those present in the
    group) and ``batch_size`` (``param="all"``).
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
