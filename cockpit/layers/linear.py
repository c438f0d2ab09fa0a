"""``nn.Linear`` with any number of leading dimensions (sequences)."""

from __future__ import annotations

from torch import nn

from cockpit.factors import AffineFactor, DenseFactor, Factor
from cockpit.layers import register_layer, scale_smaller


@register_layer(nn.Linear, scales=True)
def linear(
    module: nn.Linear, args, kwargs, grad_outputs, wanted, scale: float = 1.0
) -> dict[str, Factor]:
    """Input ``[N, *, I]`` and output gradient ``[N, *, O]`` as ``a [N,1,S,I]``, ``b [N,1,S,O]``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(3, 2).double()
        >>> x = torch.randn(4, 5, 3, dtype=torch.float64)  # N = 4 sequences of 5 steps, [N, *, I]
        >>> g = torch.randn(4, 5, 2, dtype=torch.float64)  # output gradient [N, *, O]
        >>> factors = linear(lin, (x,), {}, (g,), frozenset({"weight", "bias"}))
        >>> factors["weight"].a.shape, factors["weight"].b.shape  # [N, 1, S, I], [N, 1, S, O]
        (torch.Size([4, 1, 5, 3]), torch.Size([4, 1, 5, 2]))
        >>> def dot(p, xn, gn):  # sample n's gradient is ∇_θ ⟨g_n, lin(x_n)⟩
        ...     return (torch.func.functional_call(lin, p, (xn[None],)) * gn[None]).sum()
        >>> per_sample = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(lin.named_parameters()), x, g)  # {name: [N, *P]}
        >>> all(torch.allclose(factors[k].to_dense(), ref[k]) for k in ("weight", "bias"))
        True
    """
    x, g = args[0], grad_outputs[0]
    if x.dim() < 2:
        raise ValueError(
            f"{type(module).__name__}: input without a batch dimension {tuple(x.shape)}"
        )
    n = x.shape[0]
    out: dict[str, Factor] = {}
    if "weight" in wanted:
        xs, gs = scale_smaller(x, g, scale)
        out["weight"] = AffineFactor(
            xs.reshape(n, 1, -1, module.in_features),
            gs.reshape(n, 1, -1, module.out_features),
            module.weight.shape,
        )
    if "bias" in wanted:
        bias = g.reshape(n, -1, module.out_features).sum(1)
        out["bias"] = DenseFactor(bias if scale == 1 else bias * scale)
    return out
