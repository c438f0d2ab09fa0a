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
    """Weight shape = ``normalized_shape``; sum over the positions in between."""
    x, g = args[0], grad_outputs[0]
    x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _affine(x_hat, g, tuple(range(1, x.dim() - len(module.normalized_shape))), wanted)


@register_layer(nn.RMSNorm)
def rms_norm(module: nn.RMSNorm, args, kwargs, grad_outputs, wanted) -> dict[str, Factor]:
    """Like LayerNorm with ``x̂ = x / rms(x)``."""
    x, g = args[0], grad_outputs[0]
    x_hat = F.rms_norm(x, module.normalized_shape, None, module.eps)
    return _affine(x_hat, g, tuple(range(1, x.dim() - len(module.normalized_shape))), wanted)


@register_layer(nn.GroupNorm)
def group_norm(module: nn.GroupNorm, args, kwargs, grad_outputs, wanted) -> dict[str, Factor]:
    """Per-channel weight; sum over spatial positions."""
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
    """Eval mode: ``x̂ = (x - running_mean) / sqrt(running_var + eps)`` per channel (dim 1)."""
    x, g = args[0], grad_outputs[0]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x - module.running_mean.view(shape)) * (
        module.running_var.view(shape) + module.eps
    ).rsqrt()
    return _affine(x_hat.to(x.dtype), g, tuple(range(2, x.dim())), wanted)


__all__ = ["layer_norm", "rms_norm", "group_norm", "batch_norm"]
