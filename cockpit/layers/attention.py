"""``nn.MultiheadAttention``: exact per-sample gradients through ``torch.func``.

Attention mixes positions within a sample, so there is no short affine form for all
of its parameters; the module (including ``out_proj``, which it applies functionally
rather than by calling the child module) is re-run per sample. Both ``batch_first``
layouts, ``key_padding_mask``, 2D and 3D ``attn_mask``, ``bias_k``/``bias_v`` and
separate q/k/v projection weights are supported. Attention dropout in train mode
cannot be reproduced per sample and raises.
"""

from __future__ import annotations

import inspect

from torch import nn

from cockpit.factors import DenseFactor, Factor
from cockpit.layers import UnsupportedModuleError, register_layer
from cockpit.layers.functorch import per_sample_gradients, tensor_outputs

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _check_mha(module: nn.MultiheadAttention) -> None:
    if module.training and module.dropout > 0:
        raise UnsupportedModuleError(
            f"MultiheadAttention(dropout={module.dropout}) in train mode drops attention weights "
            "at random, which cannot be reproduced per sample. Use dropout=0 in the attention "
            "(dropout elsewhere in the model is fine) or eval mode."
        )


def _mha_batch_size(module: nn.MultiheadAttention, args, kwargs) -> int:
    query = args[0] if args else kwargs["query"]
    if query.dim() != 3:
        raise ValueError("MultiheadAttention: unbatched (2-d) inputs have no batch dimension")
    return query.shape[0 if module.batch_first else 1]


@register_layer(nn.MultiheadAttention, check=_check_mha, recurse=True, batch_size=_mha_batch_size)
def multihead_attention(module: nn.MultiheadAttention, args, kwargs, grad_outputs, wanted):
    """Re-run the attention per sample; covers ``out_proj.weight``/``out_proj.bias`` too.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> mha = torch.nn.MultiheadAttention(4, 2, batch_first=True).double()
        >>> x = torch.randn(3, 5, 4, dtype=torch.float64)  # N = 3 sequences of 5 tokens, [N, L, E]
        >>> out, weights = mha(x, x, x)  # outputs [N, L, E] and [N, L, L]
        >>> g = torch.randn_like(out)  # gradient of the output; the weights got none
        >>> wanted = frozenset(name for name, _ in mha.named_parameters())
        >>> factors = multihead_attention(mha, (x, x, x), {}, (g, None), wanted)
        >>> for name, f in sorted(factors.items()):  # [N, *P], out_proj's parameters included
        ...     print(name, tuple(f.to_dense().shape))
        in_proj_bias (3, 12)
        in_proj_weight (3, 12, 4)
        out_proj.bias (3, 4)
        out_proj.weight (3, 4, 4)
        >>> def dot(p, xn, gn):  # sample n's gradient is ∇_θ ⟨g_n, mha(x_n, x_n, x_n)⟩
        ...     out, _ = torch.func.functional_call(mha, p, (xn[None], xn[None], xn[None]))
        ...     return (out * gn[None]).sum()
        >>> per_sample = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(mha.named_parameters()), x, g)  # {name: [N, *P]}
        >>> all(torch.allclose(factors[k].to_dense(), ref[k]) for k in ref)
        True
    """
    bound = _SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    named = dict(bound.arguments)
    named.pop("self")
    query = named["query"]
    if query.dim() != 3:
        raise ValueError("MultiheadAttention: unbatched (2-d) inputs have no batch dimension")
    bdim = 0 if module.batch_first else 1
    n = query.shape[bdim]
    inputs, in_dims = {}, {}
    for k in ("query", "key", "value"):
        inputs[k], in_dims[k] = named.pop(k).detach(), bdim
    kpm = named.pop("key_padding_mask")
    if kpm is not None:
        inputs["key_padding_mask"], in_dims["key_padding_mask"] = kpm, 0
    mask = named.pop("attn_mask")
    mask_shape = None
    if mask is not None:
        if mask.dim() == 3:  # [N·H, L, S] -> [N, H, L, S]
            mask_shape = mask.shape[1:]
            inputs["attn_mask"], in_dims["attn_mask"] = mask.reshape(n, -1, *mask_shape), 0
        else:
            inputs["attn_mask"], in_dims["attn_mask"] = mask, None
    params = {k: p.detach() for k, p in module.named_parameters() if k in wanted}

    def call(p, xs):
        kw = dict(named)
        kw.update(xs)
        if mask_shape is not None:
            kw["attn_mask"] = kw["attn_mask"].reshape(-1, *mask_shape)
        from torch.func import functional_call

        return tensor_outputs(functional_call(module, p, (), kw))

    need_weights = named.get("need_weights", True)
    out_dims = [bdim, 0] if need_weights else [bdim]
    grad_outputs = list(grad_outputs) + [None] * (len(out_dims) - len(grad_outputs))
    grads = per_sample_gradients(module, params, call, inputs, in_dims, grad_outputs, out_dims)
    out: dict[str, Factor] = {k: DenseFactor(v) for k, v in grads.items()}
    missing = set(wanted) - set(out)
    if missing:  # pragma: no cover - all parameters are differentiable
        raise UnsupportedModuleError(f"MultiheadAttention: no gradient for {sorted(missing)}")
    return out


__all__ = ["multihead_attention"]
