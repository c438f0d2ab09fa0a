"""``nn.Linear`` with any number of leading dimensions (sequences)."""

from __future__ import annotations

from torch import nn

from cockpit.factors import AffineFactor, DenseFactor, Factor
from cockpit.layers import register_layer


@register_layer(nn.Linear)
def linear(module: nn.Linear, args, kwargs, grad_outputs, wanted) -> dict[str, Factor]:
    """Input ``[N, *, I]`` and output gradient ``[N, *, O]`` as ``a [N,1,S,I]``, ``b [N,1,S,O]``."""
    x, g = args[0], grad_outputs[0]
    if x.dim() < 2:
        raise ValueError(
            f"{type(module).__name__}: input without a batch dimension {tuple(x.shape)}"
        )
    n = x.shape[0]
    b = g.reshape(n, 1, -1, module.out_features)
    out: dict[str, Factor] = {}
    if "weight" in wanted:
        out["weight"] = AffineFactor(
            x.reshape(n, 1, -1, module.in_features), b, module.weight.shape
        )
    if "bias" in wanted:
        out["bias"] = DenseFactor(b.sum((1, 2)))
    return out
