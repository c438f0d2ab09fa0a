"""Hessian operator and estimators against explicit matrices and autograd Hessians."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

import cockpit.linops
from cockpit.linops import HessianOperator, hutchinson_diagonal, hutchinson_trace, lanczos
from tests.curvature_reference import explicit_hessian

pytestmark = pytest.mark.usefixtures("float64")


def sym_with_spectrum(evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g))
    return q @ torch.diag(evals) @ q.T


def test_doctests():
    failures, tried = doctest.testmod(cockpit.linops, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("negative_dominant", [False, True])
def test_lanczos_matches_eigvalsh(k, negative_dominant):
    evals = torch.linspace(-1, 3, 40)
    if negative_dominant:
        evals[0] = -6.0
    a = sym_with_spectrum(evals)
    res = lanczos(a, k=k, tol=1e-10, generator=torch.Generator().manual_seed(1))
    expected = evals[evals.abs().argsort(descending=True)][:k]
    assert res.converged and res.num_matvecs <= 40
    torch.testing.assert_close(res.eigenvalues, expected, atol=1e-8, rtol=1e-8)
    # the stopping rule bounds the eigenvalue error by r²/gap, so residuals r are ~√tol
    torch.testing.assert_close(
        a @ res.eigenvectors, res.eigenvectors * res.eigenvalues, atol=1e-4, rtol=0
    )
    torch.testing.assert_close(res.eigenvectors.norm(dim=0), torch.ones(k))


def test_lanczos_tolerance_is_on_the_eigenvalue_error():
    # a clustered spectrum: Lanczos stops early at tol=1e-3 and the value is that accurate
    evals = torch.cat([torch.tensor([10.0]), torch.rand(300) * 9.0])
    a = sym_with_spectrum(evals, seed=3)
    res = lanczos(a, k=1, tol=1e-3, generator=torch.Generator().manual_seed(2))
    assert res.converged and res.num_matvecs < 100
    assert abs(res.eigenvalues[0] - 10.0) <= 1e-3 * 10.0


def test_lanczos_cap_and_invariant_subspace():
    a = sym_with_spectrum(torch.linspace(1, 2, 50) ** 3)
    capped = lanczos(a, k=1, tol=1e-14, max_iter=3)
    assert not capped.converged and capped.num_matvecs == 3
    # rank-2 operator, k = 3: the Krylov space is invariant after two steps; restart
    low = torch.diag(torch.tensor([5.0, -4.0] + [0.0] * 6))
    res = lanczos(low, k=3, tol=1e-10, v0=torch.tensor([1.0, 1.0] + [0.0] * 6))
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, -4.0, 0.0]), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="k must be"):
        lanczos(low, k=9)
    with pytest.raises(ValueError, match="square"):
        lanczos(torch.ones(3, 4))


def test_lanczos_warm_start_needs_fewer_products():
    evals = torch.cat([torch.tensor([4.0]), torch.rand(199) * 3.6])
    a = sym_with_spectrum(evals, seed=5)
    first = lanczos(a, k=1, tol=1e-6, generator=torch.Generator().manual_seed(0))
    b = a + 1e-3 * sym_with_spectrum(torch.randn(200), seed=6)  # the next step's matrix
    cold = lanczos(b, k=1, tol=1e-6, generator=torch.Generator().manual_seed(0))
    warm = lanczos(b, k=1, tol=1e-6, v0=first.eigenvectors[:, 0])
    assert cold.converged and warm.converged
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, atol=1e-5, rtol=0)
    assert warm.num_matvecs < cold.num_matvecs


def test_hutchinson_unbiased_and_exact_for_diagonal():
    a = sym_with_spectrum(torch.linspace(-1, 2, 12))
    g = torch.Generator().manual_seed(0)
    k = 4000
    off = a - torch.diag(a.diagonal())
    diag = hutchinson_diagonal(a, k, g, batch_size=64)
    assert ((diag - a.diagonal()).abs() <= 5 * (off.square().sum(1) / k).sqrt()).all()
    trace = hutchinson_trace(a, k, g, batch_size=100)
    assert abs(trace - a.trace()) <= 5 * math.sqrt(2 * off.square().sum() / k)
    d = torch.diag(torch.tensor([1.0, -2.0, 3.0]))
    assert torch.equal(hutchinson_diagonal(d, 3, g), d.diagonal())
    assert hutchinson_trace(d, 5, g) == 2.0
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_trace(d, 0)


def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_hessian_operator_matches_autograd_hessian():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    op = HessianOperator.from_model(model, loss_fn, (x,), y)
    hess = explicit_hessian(model, loss_fn, x, y)
    eye = torch.eye(op.shape[0])
    torch.testing.assert_close(op @ eye, hess, atol=1e-10, rtol=1e-10)
    looped = HessianOperator.from_model(model, loss_fn, (x,), y)
    looped.batched = False
    torch.testing.assert_close(looped @ eye[:, :5], hess[:, :5], atol=1e-10, rtol=1e-10)
    v = torch.randn(op.shape[0])
    torch.testing.assert_close(op @ v, hess @ v, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op.loss_value, loss_fn(model(x), y).detach())
    assert all(p.grad is None for p in model.parameters())
    parts = op.unflatten(v)
    assert list(parts) == [k for k, _ in model.named_parameters()]
    assert torch.equal(op.flatten(parts), v)


def test_hessian_operator_refuses_changed_parameters():
    model, loss_fn = mlp(), nn.MSELoss()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    op = HessianOperator.from_model(model, loss_fn, (x,), y)
    op @ torch.ones(op.shape[0])
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        op @ torch.ones(op.shape[0])


def test_hessian_operator_of_linear_parameters_is_zero():
    w = torch.randn(3, requires_grad=True)
    op = HessianOperator(lambda p: (p["w"] * 2.0).sum(), {"w": w})
    assert torch.equal(op @ torch.eye(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(lambda p: p["w"] * 2.0, {"w": w}) @ torch.ones(3)
