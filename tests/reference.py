"""Independent float64 references: explicit per-sample gradients and quantities from them."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cockpit.quantities import (
    BatchDot,
    BatchL2,
    GradDot,
    Hist1D,
    Hist2D,
    IndividualGradients,
    Projection,
    SecondMoment,
)


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def per_sample_grads_func(model, loss_fn, x, y) -> dict[str, Tensor]:
    """g_n = ∇ l_n with l_n = loss_fn on the single sample n (batch of one), via torch.func.

    For reduction="mean" losses whose per-sample normalization is the same for every sample
    this is exactly the l_n with L = (1/N) Σ l_n; for "sum" it is the sample's summed loss.
    """
    params = {k: p.detach() for k, p in trainable(model).items()}

    def loss_n(p, xn, yn):
        out = functional_call(model, p, (xn.unsqueeze(0),))
        return loss_fn(out, yn.unsqueeze(0))

    return vmap(grad(loss_n), in_dims=(None, 0, 0), randomness="error")(params, x, y)


def per_sample_grads_loop(model, loss_fn, x, y) -> dict[str, Tensor]:
    """The same by a Python loop over samples with plain autograd."""
    params = trainable(model)
    rows = {k: [] for k in params}
    for n in range(x.shape[0]):
        loss = loss_fn(model(x[n : n + 1]), y[n : n + 1])
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for k, g in zip(params, gs, strict=True):
            rows[k].append(torch.zeros_like(params[k]) if g is None else g)
    return {k: torch.stack(v) for k, v in rows.items()}


def hist1d(values: Tensor, bins: int, low: float, high: float) -> Tensor:
    """Histogram by explicit clamping and numpy-free counting (float64)."""
    v = values.reshape(-1).double().clamp(low, high)
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    idx = torch.searchsorted(edges, v, right=True) - 1
    idx = idx.clamp(0, bins - 1)
    return torch.bincount(idx, minlength=bins).double()


def hist2d(gv: Tensor, pv: Tensor, q: Hist2D) -> Tensor:
    (gl, gh), (pl, ph) = q.range
    bg, bp = q.bins
    ge = torch.linspace(gl, gh, bg + 1, dtype=torch.float64)
    pe = torch.linspace(pl, ph, bp + 1, dtype=torch.float64)
    gi = (torch.searchsorted(ge, gv.double().clamp(gl, gh), right=True) - 1).clamp(0, bg - 1)
    pi = (torch.searchsorted(pe, pv.double().clamp(pl, ph), right=True) - 1).clamp(0, bp - 1)
    return torch.bincount((gi * bp + pi).reshape(-1), minlength=bg * bp).double().view(bg, bp)


def quantity_from_grads(q, g: Tensor, param: Tensor, direction: Tensor | None = None) -> Tensor:
    """Quantity ``q`` of one parameter from its explicit individual gradients ``g [N, *P]``."""
    n = g.shape[0]
    flat = g.reshape(n, -1)
    if isinstance(q, BatchL2):
        return (flat**2).sum(1)
    if isinstance(q, BatchDot):
        return flat @ flat.T
    if isinstance(q, SecondMoment):
        return (g**2).sum(0)
    if isinstance(q, GradDot):
        return flat @ flat.mean(0)
    if isinstance(q, Projection):
        return flat @ direction.reshape(-1)
    if isinstance(q, IndividualGradients):
        return g
    if isinstance(q, Hist1D):
        return hist1d(flat, q.bins, *q.range)
    if isinstance(q, Hist2D):
        return hist2d(flat, param.reshape(1, -1).expand_as(flat), q)
    raise TypeError(q)
