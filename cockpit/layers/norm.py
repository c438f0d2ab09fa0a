"""Normalization layers with an elementwise affine transform.

``LayerNorm``, ``GroupNorm``, ``RMSNorm`` and ``BatchNorm{1,2,3}d`` in eval mode all
compute ``y = x̂ ⊙ w + b`` with a normalized input ``x̂`` that depends on one sample
only, so ``g_n(w) = Σ b_n ⊙ x̂_n`` and ``g_n(b) = Σ b_n`` summed over the positions
that share a weight entry. The per-sample gradients are small (``[N, *P]``) and are
built directly. BatchNorm in train mode normalizes with batch statistics, which
couples the samples: its per-sample gradients are undefined and the engine raises.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cockpit.factors import DenseFactor, Factor
from cockpit.layers import UnsupportedModuleError, register_layer


def _affine(x_hat: Tensor, g: Tensor, sum_dims: tuple[int, ...], wanted) -> dict[str, Factor]:
    out: dict[str, Factor] = {}
    if "weight" in wanted:
        out["weight"] = DenseFactor((g * x_hat).sum(sum_dims) if sum_dims else g * x_hat)
    if "bias" in wanted:
        out["bias"] = DenseFactor(g.sum(sum_dims) if sum_dims else g)
    return out


@register_layer(nn.LayerNorm)
def layer_norm(module: nn.LayerNorm, args, kwargs, grad_outputs, wanted) -> dict[str, Factor]:
    """Weight shape = ``normalized_shape``; sum over the positions in between.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> ln = torch.nn.LayerNorm(4).double()
        >>> x = torch.randn(3, 5, 4, dtype=torch.float64)  # N = 3 sequences of 5 tokens, [N, T, D]
        >>> g = torch.randn(3, 5, 4, dtype=torch.float64)  # output gradient, same shape
        >>> factors = layer_norm(ln, (x,), {}, (g,), frozenset({"weight", "bias"}))
        >>> factors["weight"].to_dense().shape  # [N, *normalized_shape], summed over T
        torch.Size([3, 4])
        >>> def dot(p, xn, gn):  # sample n's gradient is ∇_θ ⟨g_n, ln(x_n)⟩
        ...     return (torch.func.functional_call(ln, p, (xn[None],)) * gn[None]).sum()
        >>> per_sample = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(ln.named_parameters()), x, g)  # {name: [N, *P]}
        >>> all(torch.allclose(factors[k].to_dense(), ref[k]) for k in ("weight", "bias"))
        True
    """
    x, g = args[0], grad_outputs[0]
    x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _affine(x_hat, g, tuple(range(1, x.dim() - len(module.normalized_shape))), wanted)


@register_layer(nn.RMSNorm)
def rms_norm(module: nn.RMSNorm, args, kwargs, grad_outputs, wanted) -> dict[str, Factor]:
    """Like LayerNorm with ``x̂ = x / rms(x)``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> rms = torch.nn.RMSNorm((2, 3), eps=1e-6).double()
        >>> x = torch.randn(4, 2, 3, dtype=torch.float64)  # [N, *normalized_shape]
        >>> g = torch.randn(4, 2, 3, dtype=torch.float64)  # output gradient, same shape
        >>> factors = rms_norm(rms, (x,), {}, (g,), frozenset({"weight"}))
        >>> w = factors["weight"].to_dense()  # [N, *normalized_shape]
        >>> x_hat = x / x.square().mean((1, 2), keepdim=True).add(1e-6).sqrt()
        >>> w.shape, torch.allclose(w, g * x_hat)  # g_n(w) = g_n ⊙ x̂_n
        (torch.Size([4, 2, 3]), True)
        >>> def dot(p, xn, gn):  # the same from torch.func: ∇_θ ⟨g_n, rms(x_n)⟩
        ...     return (torch.func.functional_call(rms, p, (xn[None],)) * gn[None]).sum()
        >>> per_sample = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))
        >>> torch.allclose(w, per_sample(dict(rms.named_parameters()), x, g)["weight"])
        True
    """
    x, g = args[0], grad_outputs[0]
    x_hat = F.rms_norm(x, module.normalized_shape, None, module.eps)
    return _affine(x_hat, g, tuple(range(1, x.dim() - len(module.normalized_shape))), wanted)


@register_layer(nn.GroupNorm)
def group_norm(module: nn.GroupNorm, args, kwargs, grad_outputs, wanted) -> dict[str, Factor]:
    """Per-channel weight; sum over spatial positions.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> gn_layer = torch.nn.GroupNorm(2, 4).double()
        >>> x = torch.randn(3, 4, 5, 5, dtype=torch.float64)  # [N, C, H, W]
        >>> g = torch.randn(3, 4, 5, 5, dtype=torch.float64)  # output gradient, same shape
        >>> factors = group_norm(gn_layer, (x,), {}, (g,), frozenset({"weight", "bias"}))
        >>> factors["weight"].to_dense().shape  # [N, C], summed over H, W
        torch.Size([3, 4])
        >>> def dot(p, xn, gn):  # sample n's gradient is ∇_θ ⟨g_n, gn_layer(x_n)⟩
        ...     return (torch.func.functional_call(gn_layer, p, (xn[None],)) * gn[None]).sum()
        >>> per_sample = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(gn_layer.named_parameters()), x, g)  # {name: [N, *P]}
        >>> all(torch.allclose(factors[k].to_dense(), ref[k]) for k in ("weight", "bias"))
        True
    """
    x, g = args[0], grad_outputs[0]
    x_hat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine(x_hat, g, tuple(range(2, x.dim())), wanted)


def _check_batch_norm(module: nn.modules.batchnorm._BatchNorm) -> None:
    if module.training or not module.track_running_stats or module.running_mean is None:
        raise UnsupportedModuleError(
            f"{type(module).__name__} normalizes with batch statistics (train mode or "
            "track_running_stats=False), which couples the samples, so per-sample gradients are "
            "undefined. Put it in eval mode (module.eval()) for tracked steps, or replace it "
            "with GroupNorm/LayerNorm."
        )


@register_layer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, check=_check_batch_norm)
def batch_norm(module: nn.modules.batchnorm._BatchNorm, args, kwargs, grad_outputs, wanted):
    """Eval mode: ``x̂ = (x - running_mean) / sqrt(running_var + eps)`` per channel (dim 1).

    Example:
        >>> import torch
        >>> from cockpit.layers import find_rule
        >>> _ = torch.manual_seed(0)
        >>> bn = torch.nn.BatchNorm2d(3).double().eval()  # eval mode: running statistics
        >>> _ = bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        >>> x = torch.randn(4, 3, 5, 5, dtype=torch.float64)  # [N, C, H, W]
        >>> g = torch.randn(4, 3, 5, 5, dtype=torch.float64)  # output gradient, same shape
        >>> factors = batch_norm(bn, (x,), {}, (g,), frozenset({"weight", "bias"}))
        >>> factors["weight"].to_dense().shape  # [N, C], summed over H, W
        torch.Size([4, 3])
        >>> def dot(p, xn, gn):  # sample n's gradient is ∇_θ ⟨g_n, bn(x_n)⟩
        ...     return (torch.func.functional_call(bn, p, (xn[None],)) * gn[None]).sum()
        >>> per_sample = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(bn.named_parameters()), x, g)  # {name: [N, *P]}
        >>> all(torch.allclose(factors[k].to_dense(), ref[k]) for k in ("weight", "bias"))
        True
        >>> find_rule(bn).check(bn.train())  # batch statistics couple the samples
        Traceback (most recent call last):
        ...
        cockpit.layers.UnsupportedModuleError: BatchNorm2d normalizes with batch statistics ...
    """
    x, g = args[0], grad_outputs[0]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x - module.running_mean.view(shape)) * (
        module.running_var.view(shape) + module.eps
    ).rsqrt()
    return _affine(x_hat.to(x.dtype), g, tuple(range(2, x.dim())), wanted)


__all__ = ["layer_norm", "rms_norm", "group_norm", "batch_norm"]
