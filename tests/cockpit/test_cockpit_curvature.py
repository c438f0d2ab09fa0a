"""Curvature instruments (hess_trace, tic_diag, tic_trace, hess_max_ev) vs the explicit Hessian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cockpit import Cockpit
from instruments.hess_max_ev import HessMaxEV
from instruments.hess_trace import HessTrace
from tests.reference import per_sample_grads_func

pytestmark = pytest.mark.usefixtures("float64")


def explicit_hessian(model, loss_fn, x, y):
    names = [k for k, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def f(v):
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            out[k] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return loss_fn(torch.func.functional_call(model, out, (x,)), y)

    return torch.autograd.functional.hessian(f, flat)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_curvature_instruments_match_explicit_hessian(reduction):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    inst = [HessTrace(), "tic_diag", "tic_trace", HessMaxEV(tol=1e-10, max_iter=200)]
    with Cockpit(model, loss_fn, opt, instruments=inst) as cockpit:
        loss = loss_fn(model(x), y)
        with cockpit.step(0, loss):
            loss.backward()
        latest = cockpit.latest()
    H = explicit_hessian(model, loss_fn, x, y)
    h = torch.diagonal(H)
    assert latest["hess_trace"] == pytest.approx(float(h.sum()), rel=1e-9)
    assert latest["hess_trace.exact"] == 1.0
    evals = torch.linalg.eigvalsh(H)
    top = float(evals[evals.abs().argmax()])
    assert latest["hess_max_ev"] == pytest.approx(top, rel=1e-6)
    assert latest["hess_max_ev.converged"] == 1.0
    g = per_sample_grads_func(model, loss_fn, x, y)
    G = torch.cat([v.reshape(7, -1) for v in g.values()], 1)
    n = 7
    h_mean = h / n if reduction == "sum" else h
    tic_d = float(((G**2).mean(0) / (h_mean + 1e-7)).sum())
    tic_t = float((G**2).sum(1).mean() / (h_mean.sum() + 1e-7))
    assert latest["tic_diag"] == pytest.approx(tic_d, rel=1e-8)
    assert latest["tic_trace"] == pytest.approx(tic_t, rel=1e-8)
    assert math.isfinite(latest["tic_diag"])
