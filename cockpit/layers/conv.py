"""Convolutions: ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d``.

Stride, padding (incl. ``"same"`` and non-zero padding modes), dilation, groups and
optional bias are supported.

Convolutions reduce to the affine form by unfolding the input into patches:
``a [N, G, S, C_in/G·K]`` with S output positions and K kernel elements. A transposed
convolution is the adjoint of a convolution, so its weight gradient is the
convolution-weight gradient with the roles swapped: the patches come from the output
gradient and the "output gradient" is the input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cockpit.factors import AffineFactor, DenseFactor, Factor
from cockpit.layers import register_layer


def unfold(
    x: Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
) -> Tensor:
    """Patches of an N-d input: ``[N, C, *spatial]`` → ``[N, S, C·prod(kernel_size)]``.

    Columns are ordered like a flattened conv weight ``[C, k_1, ..., k_d]``.

    Example:
        >>> import torch
        >>> x = torch.arange(8.0).view(1, 2, 4)
        >>> unfold(x, (2,), (2,), (0,), (1,)).tolist()
        [[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]
    """
    d = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * d
        elif padding == "same":
            pads = []
            for k, dil in zip(reversed(kernel_size), reversed(dilation), strict=True):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = (0,) * d
        else:
            raise ValueError(f"unknown padding {padding!r}")
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    for i in range(d):
        x = x.unfold(2 + i, dilation[i] * (kernel_size[i] - 1) + 1, stride[i])
    if any(dil > 1 for dil in dilation):
        x = x[(...,) + tuple(slice(None, None, dil) for dil in dilation)]
    n, c = x.shape[:2]
    # [N, C, L_1..L_d, k_1..k_d] -> [N, L_1..L_d, C, k_1..k_d]
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    x = x.permute(perm)
    s = x.shape[1 : 1 + d].numel()
    return x.reshape(n, s, -1)


def _grouped(t: Tensor, groups: int) -> Tensor:
    """``[N, S, C·K]`` with group-major columns → ``[N, G, S, C/G·K]``."""
    n, s, _ = t.shape
    return t.reshape(n, s, groups, -1).transpose(1, 2)


def _channels_last(t: Tensor, groups: int) -> Tensor:
    """``[N, C, *spatial]`` → ``[N, G, S, C/G]``."""
    n, c = t.shape[:2]
    return t.reshape(n, groups, c // groups, -1).transpose(2, 3)


@register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(module: nn.modules.conv._ConvNd, args, kwargs, grad_outputs, wanted) -> dict[str, Factor]:
    """Unfolded input patches against the output gradient."""
    x, g = args[0], grad_outputs[0]
    d = len(module.kernel_size)
    if x.dim() != d + 2:
        raise ValueError(
            f"{type(module).__name__}: expected a batched {d + 2}-d input, got {tuple(x.shape)}"
        )
    out: dict[str, Factor] = {}
    if "weight" in wanted:
        padding = module.padding
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = (0,) * d
        a = unfold(x, module.kernel_size, module.stride, padding, module.dilation)
        out["weight"] = AffineFactor(
            _grouped(a, module.groups), _channels_last(g, module.groups), module.weight.shape
        )
    if "bias" in wanted:
        out["bias"] = DenseFactor(g.reshape(g.shape[0], g.shape[1], -1).sum(2))
    return out


@register_layer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(
    module: nn.modules.conv._ConvTransposeNd, args, kwargs, grad_outputs, wanted
) -> dict[str, Factor]:
    """Adjoint of a convolution: patches of the output gradient against the input."""
    x, g = args[0], grad_outputs[0]
    d = len(module.kernel_size)
    if x.dim() != d + 2:
        raise ValueError(
            f"{type(module).__name__}: expected a batched {d + 2}-d input, got {tuple(x.shape)}"
        )
    out: dict[str, Factor] = {}
    if "weight" in wanted:
        patches = unfold(g, module.kernel_size, module.stride, module.padding, module.dilation)
        # Patches cover exactly the input positions; output_padding rows are never read.
        expected = x.shape[2:].numel()
        if patches.shape[1] != expected:  # pragma: no cover - guarded by torch's size rules
            raise RuntimeError(
                f"{type(module).__name__}: patch count {patches.shape[1]} != {expected}"
            )
        out["weight"] = AffineFactor(
            _grouped(patches, module.groups), _channels_last(x, module.groups), module.weight.shape
        )
    if "bias" in wanted:
        out["bias"] = DenseFactor(g.reshape(g.shape[0], g.shape[1], -1).sum(2))
    return out


__all__ = ["unfold", "conv", "conv_transpose"]
