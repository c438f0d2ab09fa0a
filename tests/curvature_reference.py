"""Explicit float64 curvature references: GGN from Jacobians, Hessian from autograd.

Independent of the engine: the GGN is ``Jᵀ H_f J`` with ``J`` the Jacobian of the loss
input (the model output, possibly reshaped) w.r.t. the flattened trainable parameters
(``torch.func.jacrev``) and ``H_f`` the Hessian of the loss w.r.t. the loss input
(``torch.autograd.functional.hessian``); the Hessian is
``torch.autograd.functional.hessian`` of the loss w.r.t. the flattened parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _unflatten(theta: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, p in params.items():
        out[k] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def flatten(values: dict[str, Tensor], model: nn.Module) -> Tensor:
    return torch.cat([values[k].reshape(-1) for k in trainable(model)])


def _forward(model, x, transform) -> Callable[[Tensor], Tensor]:
    params = {k: p.detach() for k, p in trainable(model).items()}

    def f(theta: Tensor) -> Tensor:
        out = functional_call(model, _unflatten(theta, params), (x,))
        return transform(out) if transform is not None else out

    return f


def theta0(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable(model).values()])


def explicit_ggn(model, loss_fn, x, y, transform=None) -> Tensor:
    """``[D, D]`` GGN of ``loss_fn(transform(model(x)), y)``."""
    f = _forward(model, x, transform)
    th = theta0(model)
    out = f(th).detach()
    jac = jacrev(f)(th).reshape(out.numel(), th.numel())
    h_out = torch.autograd.functional.hessian(
        lambda o: loss_fn(o.reshape(out.shape), y), out.reshape(-1)
    )
    return jac.T @ h_out @ jac


def explicit_hessian(model, loss_fn, x, y, transform=None) -> Tensor:
    """``[D, D]`` Hessian of ``loss_fn(transform(model(x)), y)``."""
    f = _forward(model, x, transform)
    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no double backward
        return torch.autograd.functional.hessian(lambda th: loss_fn(f(th), y), theta0(model))


def split(vec: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """Flat ``[D]`` → ``{name: [*P]}`` in ``named_parameters`` order."""
    return {k: v.clone() for k, v in _unflatten(vec, trainable(model)).items()}
