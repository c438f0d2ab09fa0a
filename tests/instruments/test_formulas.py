"""Instrument formulas against independent float64 computations.

Individual gradients come from ``torch.func`` (``vmap(grad(...))`` over samples, with
``functional_call``) on a small MLP, a small CNN and a residual net, for two losses:

- ``"ce_mean"``: ``L = (1/N) Σ_n CE(f(x_n), y_n)``. ``l_n = CE(f(x_n), y_n)``,
  ``g_n = ∇l_n`` and ``g = (1/N) Σ_n g_n = ∇L``.
- ``"mse_sum"``: ``L = Σ_n ‖f(x_n) − y_n‖²`` (``MSELoss(reduction="sum")``).
  ``l_n = ‖f(x_n) − y_n‖²``, ``g_n = ∇l_n`` (unscaled, as always) and
  ``g = (1/N) Σ_n g_n = ∇L / N``: the instruments are defined on the mean of the
  individual gradients whatever the reduction.

The references below are written from the per-sample gradient matrix ``G [N, D]``
directly (sample variances, projections, residuals), not from the sums the
instruments take as inputs.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from instruments.alpha import ZERO_VARIANCE_FLOOR, alpha, alpha_from_samples
from instruments.cabs import cabs, effective_lr
from instruments.early_stopping import early_stopping
from instruments.gradient_tests import (
    INNER_TEST_THRESHOLD,
    NORM_TEST_THRESHOLD,
    ORTHO_TEST_THRESHOLD,
    inner_test,
    norm_test,
    ortho_test,
    suggested_batch_size,
)
from instruments.histograms import bin_edges, hist_1d, hist_2d
from instruments.mean_gsnr import mean_gsnr
from instruments.tic import tic_diag, tic_trace

RTOL = 1e-10
N = 12
C = 3


def close(a: float, b: float, rtol: float = RTOL) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(16, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.sigmoid(self.conv2(h))
        return self.fc(h.flatten(1))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + self.block(h)
        return self.out(self.norm(h))


MODELS = {"mlp": (MLP, (5,)), "cnn": (CNN, (1, 8, 8)), "resnet": (ResNet, (6,))}
LOSSES = ("ce_mean", "mse_sum")
CASES = [(m, loss) for m in MODELS for loss in LOSSES]


def sample_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Individual loss l_n of one sample (out [1, C])."""
    if kind == "ce_mean":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y, reduction="sum")


def batch_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "ce_mean":
        return F.cross_entropy(out, y, reduction="mean")
    return F.mse_loss(out, y, reduction="sum")


def make_batch(model_name: str, kind: str, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = MODELS[model_name][1]
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    if kind == "ce_mean":
        y = torch.randint(0, C, (n,), generator=gen)
    else:
        y = torch.randn(n, C, generator=gen, dtype=torch.float64)
    return x, y


def make_model(model_name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_name][0]().to(torch.float64)


def per_sample(model: nn.Module, params: dict, kind: str, x, y):
    """Individual losses [N] and individual gradients {name: [N, *shape]}."""

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return sample_loss(kind, out, yi.unsqueeze(0))

    losses = vmap(loss_one, in_dims=(None, 0, 0))(params, x, y)
    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return losses.detach(), {k: v.detach() for k, v in grads.items()}


@cache
def case_data(model_name: str, kind: str):
    """Everything the tests need for one model and loss, computed once."""
    model = make_model(model_name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = make_batch(model_name, kind, N, seed=1)
    losses, grads = per_sample(model, params, kind, x, y)
    G = torch.cat([g.reshape(N, -1) for g in grads.values()], dim=1)  # [N, D]

    # autograd batch gradient: ∇L = g (mean) or N g (sum)
    model.zero_grad()
    batch_loss(kind, model(x), y).backward()
    grad_l = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    scale = 1.0 if kind == "ce_mean" else float(N)
    torch.testing.assert_close(grad_l, scale * G.mean(0), rtol=1e-12, atol=1e-14)
    return model, params, grads, G, losses, (x, y)


def engine_inputs(grads: dict):
    """Inputs as an engine gathers them: per-tensor pieces, summed over tensors."""
    g = {k: v.mean(0) for k, v in grads.items()}
    sum_l2 = sum(v.square().sum() for v in grads.values())
    grad_norm_sq = sum(gk.square().sum() for gk in g.values())
    # projections g_nᵀg summed over tensors *before* squaring
    proj = sum(torch.einsum("n...,...->n", grads[k], g[k]) for k in grads)
    sum_dot_sq = proj.square().sum()
    second_moment = [v.square().sum(0) for v in grads.values()]
    return {
        "grad": list(g.values()),
        "sum_l2": sum_l2,
        "grad_norm_sq": grad_norm_sq,
        "sum_dot_sq": sum_dot_sq,
        "second_moment": second_moment,
    }


# ----------------------------------------------------------------- gradient tests


@pytest.mark.parametrize("model_name,kind", CASES)
def test_gradient_tests_match_explicit_per_sample_gradients(model_name, kind):
    _, _, grads, G, _, _ = case_data(model_name, kind)
    inp = engine_inputs(grads)
    n = G.shape[0]
    g = G.mean(0)
    g_norm = g.norm()

    # norm test: standard error of the mean gradient relative to its norm
    sample_var = (G - g).square().sum() / (n - 1)  # trace of the sample covariance
    ref_norm = float(torch.sqrt(sample_var / n) / g_norm)
    # inner-product test: standard error of the projections g_nᵀ g
    p = G @ g
    ref_inner = float(torch.sqrt(p.var(correction=1) / n) / g_norm**2)
    # orthogonality test: residuals orthogonal to g
    resid = G - torch.outer(p / g_norm**2, g)
    assert float((resid @ g).abs().max()) < 1e-12 * float(g_norm) * float(G.norm())
    ref_ortho = float(torch.sqrt(resid.square().sum() / (n - 1) / n) / g_norm)

    got_norm = norm_test(inp["sum_l2"], inp["grad_norm_sq"], n)
    got_inner = inner_test(inp["sum_dot_sq"], inp["grad_norm_sq"], n)
    got_ortho = ortho_test(inp["sum_l2"], inp["sum_dot_sq"], inp["grad_norm_sq"], n)
    assert close(got_norm, ref_norm)
    assert close(got_inner, ref_inner)
    assert close(got_ortho, ref_ortho)
    assert got_norm > 0 and got_inner > 0 and got_ortho > 0


def test_gradient_tests_cockpit_backpack_scaling():
    """Re-derive Cockpit's formulas from BackPACK's 1/N-scaled individual gradients."""
    _, _, grads, G, _, _ = case_data("mlp", "ce_mean")
    inp = engine_inputs(grads)
    B = G.shape[0]
    bp = G / B  # BackPACK BatchGrad under mean reduction
    grad_l2_squared = bp.sum(0).square().sum()
    batch_l2 = bp.square().sum(1)
    batch_dot = bp @ bp.T
    # norm_test.py: var_l1 = (B² Σ batch_l2 − B ‖g‖²)/(B−1); sqrt(var_l1 / B / ‖g‖²)
    var_l1 = (1 / (B - 1)) * (B**2 * batch_l2.sum() - B * grad_l2_squared)
    cockpit_norm = float((var_l1 / B / grad_l2_squared).sqrt())
    # inner_test.py
    projections = B * batch_dot.sum(1)
    var_proj = (1 / (B - 1)) * ((projections**2).sum() - B * grad_l2_squared**2)
    cockpit_inner = float((var_proj / B / grad_l2_squared**2).sqrt())
    # ortho_test.py
    var_orth = (1 / (B - 1)) * (
        B**2 * batch_dot.diag().sum() - (projections**2 / grad_l2_squared).sum()
    )
    cockpit_ortho = float((var_orth / B / grad_l2_squared).sqrt())

    assert close(norm_test(inp["sum_l2"], inp["grad_norm_sq"], B), cockpit_norm)
    assert close(inner_test(inp["sum_dot_sq"], inp["grad_norm_sq"], B), cockpit_inner)
    assert close(
        ortho_test(inp["sum_l2"], inp["sum_dot_sq"], inp["grad_norm_sq"], B), cockpit_ortho
    )


def test_gradient_tests_degenerate_inputs():
    # N = 1: no sample variance
    assert math.isnan(norm_test(2.0, 2.0, 1))
    assert math.isnan(inner_test(4.0, 2.0, 1))
    assert math.isnan(ortho_test(2.0, 4.0, 2.0, 1))
    # ‖g‖ = 0
    assert math.isnan(norm_test(3.0, 0.0, 4))
    assert math.isnan(inner_test(3.0, 0.0, 4))
    assert math.isnan(ortho_test(3.0, 1.0, 0.0, 4))

    # identical individual gradients: zero variance, negative only through rounding
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(1000, generator=gen, dtype=torch.float64) * 0.1 + 0.3
    G = row.expand(7, -1).clone()
    g = G.mean(0)
    sum_l2 = G.square().sum()
    gsq = g.square().sum()
    sum_dot_sq = (G @ g).square().sum()
    for value in (
        norm_test(sum_l2, gsq, 7),
        inner_test(sum_dot_sq, gsq, 7),
        ortho_test(sum_l2, sum_dot_sq, gsq, 7),
    ):
        assert not math.isnan(value) and 0.0 <= value < 1e-6
    # a negative radicand of a few ulps is clamped to exactly zero (Cockpit: NaN)
    assert norm_test(2.0 - 4e-16, 1.0, 2) == 0.0
    assert ortho_test(1.0, 1.0 + 4e-16, 1.0, 3) == 0.0

    # inconsistent inputs (BackPACK's 1/N² left in Σ‖g_n‖²) are NaN with a warning
    with pytest.warns(RuntimeWarning, match="inconsistent"):
        assert math.isnan(norm_test(sum_l2 / 49, gsq, 7))

    with pytest.raises(ValueError):
        norm_test(G.square().sum(1), gsq, 7)  # per-sample vector instead of the sum
    with pytest.raises(ValueError):
        norm_test(1.0, 1.0, 0)


def test_suggested_batch_size():
    assert ORTHO_TEST_THRESHOLD == pytest.approx(5.671281819617709, rel=1e-15)
    assert NORM_TEST_THRESHOLD == INNER_TEST_THRESHOLD == 0.9
    _, _, grads, G, _, _ = case_data("resnet", "ce_mean")
    inp = engine_inputs(grads)
    theta = norm_test(inp["sum_l2"], inp["grad_norm_sq"], N)
    n_star = suggested_batch_size(theta, N, NORM_TEST_THRESHOLD)
    # θ ∝ 1/√N: a batch of N* reaches the target
    assert close(theta * math.sqrt(N / n_star), NORM_TEST_THRESHOLD)
    assert close(n_star, N * (theta / 0.9) ** 2)
    assert suggested_batch_size(0.45, 32, 0.9) == pytest.approx(8.0)
    assert math.isnan(suggested_batch_size(math.nan, 32, 0.9))
    with pytest.raises(ValueError):
        suggested_batch_size(1.0, 8, 0.0)


# --------------------------------------------------------------- GSNR, EB, TIC, CABS


@pytest.mark.parametrize("model_name,kind", CASES)
def test_gsnr_eb_tic_cabs_match_explicit(model_name, kind):
    _, _, grads, G, losses, _ = case_data(model_name, kind)
    inp = engine_inputs(grads)
    n, d = G.shape
    g = G.mean(0)

    # mean GSNR with the biased per-coordinate variance
    var_b = G.var(dim=0, correction=0)
    ref_gsnr = float((g.square() / (var_b + 1e-5)).mean())
    assert close(mean_gsnr(inp["second_moment"], inp["grad"], n), ref_gsnr)
    assert close(mean_gsnr(G.square().sum(0), g, n), ref_gsnr)  # flat inputs
    ref_gsnr_eps = float((g.square() / (var_b + 1e-3)).mean())
    assert close(mean_gsnr(inp["second_moment"], inp["grad"], n, eps=1e-3), ref_gsnr_eps)

    # EB criterion with the unbiased per-coordinate variance
    var_u = G.var(dim=0, correction=1)
    ref_eb = 1.0 - n * float((g.square() / (var_u + 1e-5)).mean())
    assert close(early_stopping(inp["second_moment"], inp["grad"], n), ref_eb)

    # TIC: tr(H⁻¹ C) with diagonal H and the uncentered second moment C = GᵀG / N
    gen = torch.Generator().manual_seed(5)
    h = F.softplus(torch.randn(d, generator=gen, dtype=torch.float64)) + 0.05
    h_pieces = list(torch.split(h, [v[0].numel() for v in grads.values()]))
    h_pieces = [hp.reshape(v.shape[1:]) for hp, v in zip(h_pieces, grads.values(), strict=True)]
    c_diag = torch.diagonal(G.T @ G) / n
    ref_tic_diag = float((c_diag / (h + 1e-7)).sum())
    ref_tic_trace = float(torch.trace(G.T @ G) / n / (h.sum() + 1e-7))
    assert close(tic_diag(inp["second_moment"], n, h_pieces), ref_tic_diag)
    assert close(tic_trace(inp["sum_l2"], n, h.sum()), ref_tic_trace)
    assert close(tic_trace(inp["sum_l2"], n, float(h.sum())), ref_tic_trace)
    assert close(tic_trace(inp["sum_l2"], n, h_pieces), ref_tic_trace)

    # CABS: lr × biased gradient variance / mean loss
    lr = 0.07
    ref_cabs = lr * float((G - g).square().sum(1).mean()) / float(losses.mean())
    got_cabs = cabs(lr, inp["sum_l2"], inp["grad_norm_sq"], n, losses.mean())
    assert close(got_cabs, ref_cabs)


def test_gsnr_eb_cockpit_backpack_scaling():
    """Re-derive Cockpit's MeanGSNR / EarlyStopping / TIC / CABS from BackPACK sums."""
    _, _, grads, G, losses, _ = case_data("cnn", "ce_mean")
    inp = engine_inputs(grads)
    B = G.shape[0]
    bp = G / B
    sgs = bp.square().sum(0)  # BackPACK-style sum_grad_squared
    grad_squared = bp.sum(0).square()
    cockpit_gsnr = float((grad_squared / (B * sgs - grad_squared + 1e-5)).mean())
    diag_variance = (B**2 * sgs - B * grad_squared) / (B - 1)
    cockpit_eb = 1 - B * float((grad_squared / (diag_variance + 1e-5)).mean())
    h = torch.linspace(0.1, 2.0, G.shape[1], dtype=torch.float64)
    cockpit_tic_diag = float((B * sgs / (h + 1e-7)).sum())
    cockpit_tic_trace = float(B * sgs.sum() / (h.sum() + 1e-7))
    lr = 0.3
    cockpit_cabs = float(lr * (B**2 * sgs - B * grad_squared).sum() / (B * losses.mean()))

    assert close(mean_gsnr(inp["second_moment"], inp["grad"], B), cockpit_gsnr)
    assert close(early_stopping(inp["second_moment"], inp["grad"], B), cockpit_eb)
    assert close(tic_diag(inp["second_moment"], B, h), cockpit_tic_diag)
    assert close(tic_trace(inp["sum_l2"], B, h.sum()), cockpit_tic_trace)
    assert close(cabs(lr, inp["sum_l2"], inp["grad_norm_sq"], B, losses.mean()), cockpit_cabs)


def test_gsnr_eb_tic_cabs_edge_cases():
    sm = torch.tensor([2.0, 8.0], dtype=torch.float64)
    g = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert math.isnan(mean_gsnr(sm, g, 1))
    assert math.isnan(early_stopping(sm, g, 1))
    with pytest.raises(ValueError):
        mean_gsnr(sm, g[:1], 2)
    with pytest.raises(ValueError):
        early_stopping([sm], [g, g], 2)

    with pytest.warns(RuntimeWarning, match="non-positive"):
        tic_diag(sm, 2, torch.tensor([1.0, -0.5]))
    with pytest.warns(RuntimeWarning, match="non-positive"):
        tic_trace(10.0, 2, -1.0)
    with pytest.warns(RuntimeWarning, match="non-positive"):
        tic_trace(10.0, 2, [torch.tensor([3.0, 0.0])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert close(tic_trace(10.0, 2, 4.0, eps=0.0), 1.25)
        assert close(tic_diag(sm, 2, torch.tensor([0.5, 2.0]), eps=0.0), 2 + 2)

    with pytest.warns(RuntimeWarning, match="positive mean loss"):
        assert math.isnan(cabs(0.1, 10.0, 1.0, 4, 0.0))


# ------------------------------------------------------------------ effective lr


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("kind", LOSSES)
def test_effective_lr_equals_sgd_lr(kind):
    model = make_model("mlp")
    x, y = make_batch("mlp", kind, N, seed=2)
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    before = _flat([p.detach().clone() for p in model.parameters()])
    opt.zero_grad()
    batch_loss(kind, model(x), y).backward()
    grad_l = _flat([p.grad for p in model.parameters()])
    opt.step()
    d = _flat([p.detach() for p in model.parameters()]) - before
    g = grad_l if kind == "ce_mean" else grad_l / N  # mean of individual gradients
    # SGD on the summed loss steps −lr Σ_n g_n = −(N lr) g
    expected = lr if kind == "ce_mean" else N * lr
    assert close(effective_lr(d, g), expected, rtol=1e-9)


def test_effective_lr_momentum_and_ascent():
    model = make_model("resnet")
    lr, mu = 0.1, 0.9
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu)
    grads, updates = [], []
    for seed in (3, 4):
        x, y = make_batch("resnet", "ce_mean", N, seed=seed)
        before = _flat([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        batch_loss("ce_mean", model(x), y).backward()
        grads.append(_flat([p.grad.clone() for p in model.parameters()]))
        opt.step()
        updates.append(_flat([p.detach() for p in model.parameters()]) - before)
    g0, g1 = grads
    # second step: d = −lr (μ g0 + g1)  ⇒  lr_eff = lr (1 + μ ⟨g0, g1⟩ / ‖g1‖²)
    expected = lr * (1 + mu * float(g0 @ g1) / float(g1 @ g1))
    assert close(effective_lr(updates[1], g1), expected, rtol=1e-9)
    with pytest.warns(RuntimeWarning, match="does not descend"):
        assert effective_lr(g1, g1) == pytest.approx(-1.0)
    assert math.isnan(effective_lr(g1, torch.zeros_like(g1)))


# ------------------------------------------------------------------------- alpha


def cockpit_alpha(t, fs, dfs, var_fs, var_dfs):
    """Cockpit's _fit_quadratic + _get_alpha, re-derived step by step (numpy, x-space)."""
    var_fs = [1e-10 if v == 0 else v for v in var_fs]
    var_dfs = [1e-10 if v == 0 else v for v in var_dfs]
    phi = np.array([[1, 0, 0], [1, t, t**2], [0, 1, 0], [0, 1, 2 * t]], dtype=float).T
    lam_inv = np.linalg.inv(np.diag(var_fs + var_dfs))
    mu = np.linalg.inv(phi @ lam_inv @ phi.T) @ phi @ lam_inv @ np.array(fs + dfs)
    if mu[2] < 0:
        return -1.0
    alpha_bar = -mu[1] / mu[2]
    return 2 * t / alpha_bar - 1


def quadratic_setup(dim: int, n: int, noisy: bool, seed: int = 0):
    """Per-sample quadratics l_n(x) = ½ (x − x*_n)ᵀ A (x − x*_n) and a descent line."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = m @ m.T + dim * torch.eye(dim, dtype=torch.float64)
    x_star = torch.randn(dim, generator=gen, dtype=torch.float64)
    spread = 0.7 if noisy else 0.0
    x_stars = x_star + spread * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    x0 = x_star + 2.0 * torch.randn(dim, generator=gen, dtype=torch.float64)
    # direction: a descent direction that is not the gradient (so the fit is generic)
    grad0 = a @ (x0 - x_stars.mean(0))
    u = -(grad0 + 0.5 * torch.randn(dim, generator=gen, dtype=torch.float64))
    u = u / u.norm()
    assert float(grad0 @ u) < 0
    # exact line minimum of the mean loss along u
    t_min = float(-(grad0 @ u) / (u @ a @ u))

    def samples(x):
        diff = x - x_stars  # [n, dim]
        losses = 0.5 * torch.einsum("ni,ij,nj->n", diff, a, diff)
        proj = (diff @ a) @ u  # individual gradients A (x − x*_n) projected on u
        return losses, proj

    return x0, u, t_min, samples


@pytest.mark.parametrize("dim", [1, 6])
@pytest.mark.parametrize("noisy", [False, True])
def test_alpha_on_quadratic(dim, noisy):
    x0, u, t_min, samples = quadratic_setup(dim, n=9, noisy=noisy, seed=dim)
    cases = [(1.0, 0.0), (2.0, 1.0), (0.5, -0.5), (3.0, 2.0), (1e-6, -1 + 1e-6)]
    for factor, expected in cases:
        tau = factor * t_min
        losses0, proj0 = samples(x0)
        losses1, proj1 = samples(x0 + tau * u)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = alpha_from_samples(tau, losses0, losses1, proj0, proj1)
        zero_var = [w for w in caught if "variance of" in str(w.message)]
        # noise-free: f and/or df warn (a variance of identical values can come out
        # as 1e-33 instead of 0 through the rounding of the mean; like Cockpit, only
        # exact zeros are floored)
        assert (len(zero_var) == 0) if noisy else (1 <= len(zero_var) <= 2)
        assert len(caught) == len(zero_var)
        assert got == pytest.approx(expected, abs=1e-9), (factor, got)
    # zero step: the fit is singular; Cockpit reports −1 for it
    losses0, proj0 = samples(x0)
    with pytest.warns(RuntimeWarning, match="same point"):
        assert alpha_from_samples(0.0, losses0, losses0, proj0, proj0) == -1.0


def test_alpha_concave_and_singular():
    # concave along the step: l_n(x) = −½ (x − c_n)² + const, stepping downhill
    cs = torch.tensor([-0.3, -0.2, -0.5, 0.1], dtype=torch.float64)
    x0, tau = 0.0, 0.8

    def samples(x):
        return -0.5 * (x - cs) ** 2 + 3.0, -(x - cs)  # losses, derivatives along +x

    l0, p0 = samples(x0)
    assert float(p0.mean()) < 0  # a descent step
    l1, p1 = samples(x0 + tau)
    assert alpha_from_samples(tau, l0, l1, p0, p1) == -1.0
    assert alpha(1.0, 1.0, 0.0, 0.1, 0.1, -0.5, -1.5, 0.1, 0.1) == -1.0  # w2 < 0

    # singular fit: with infinite loss variances no function values constrain w0
    with pytest.warns(RuntimeWarning, match="quadratic fit"):
        assert math.isnan(alpha(1.0, 1.0, 0.5, math.inf, math.inf, -1.0, 0.0, 0.1, 0.1))
    # a single sample has no variance: α is undefined
    one = torch.tensor([1.0], dtype=torch.float64)
    assert math.isnan(alpha_from_samples(0.5, one, one, -one, one))
    assert math.isnan(alpha(0.5, 1.0, 0.5, math.nan, 0.1, -1.0, 0.2, 0.1, 0.1))
    with pytest.raises(ValueError):
        alpha(-1.0, 1.0, 0.5, 0.1, 0.1, -1.0, 0.2, 0.1, 0.1)
    with pytest.raises(ValueError):
        alpha_from_samples(0.5, one, torch.ones(3), -one, one)


def test_alpha_reproduces_cockpit_fit():
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(200):
        t = float(rng.uniform(0.05, 3.0))
        fs = [float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.2, 2.0))]
        dfs = [float(rng.normal(-1.0, 0.5)), float(rng.normal(0.0, 0.8))]
        var_fs = [float(v) for v in rng.uniform(0.01, 1.0, 2)]
        var_dfs = [float(v) for v in rng.uniform(0.01, 1.0, 2)]
        ref = cockpit_alpha(t, fs, dfs, var_fs, var_dfs)
        got = alpha(t, *fs, *var_fs, *dfs, *var_dfs)
        if ref == -1.0:
            assert got == -1.0
        else:
            assert got == pytest.approx(ref, rel=1e-9, abs=1e-10)
            checked += 1
    assert checked > 50
    # zero variances use Cockpit's 1e-10 floor; the weights are then 1e10 apart and
    # Cockpit's normal-equation inverse is only good to ~1e-6, so compare both with
    # the exact (rational) weighted least-squares solution
    assert ZERO_VARIANCE_FLOOR == 1e-10
    args = (0.7, [1.0, 0.6], [-1.2, 0.3], [0.0, 0.2], [0.5, 0.0])
    with pytest.warns(RuntimeWarning, match="variance of"):
        got = alpha(args[0], *args[1], *args[3], *args[2], *args[4])
    exact = exact_alpha(*args)
    assert got == pytest.approx(exact, rel=1e-12)
    assert cockpit_alpha(*args) == pytest.approx(exact, rel=1e-5)


def exact_alpha(t, fs, dfs, var_fs, var_dfs):
    """The same fit in exact rational arithmetic (Cockpit's floor for zero variances)."""
    var = [Fraction(1e-10 if v == 0 else v) for v in var_fs + var_dfs]
    t = Fraction(t)
    rows = [[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]]
    y = [Fraction(v) for v in fs + dfs]
    aug = [
        [sum(rows[k][i] * rows[k][j] / var[k] for k in range(4)) for j in range(3)]
        + [sum(rows[k][i] * y[k] / var[k] for k in range(4))]
        for i in range(3)
    ]
    for i in range(3):  # Gauss-Jordan, exact
        aug[i] = [a / aug[i][i] for a in aug[i]]
        for j in range(3):
            if j != i:
                aug[j] = [a - aug[j][i] * b for a, b in zip(aug[j], aug[i], strict=True)]
    w1, w2 = aug[1][3], aug[2][3]
    return -1.0 if w2 < 0 else float(-2 * t * w2 / w1 - 1)


def test_alpha_exact_with_floored_variances_and_extreme_steps():
    rng = np.random.default_rng(3)
    for t in (1e-6, 1e-3, 1.0, 50.0):
        for _ in range(20):
            w1, w2 = rng.uniform(-2, -0.1), rng.uniform(0.1, 2)
            fs = [1.0 + rng.normal(0, 1e-3), 1.0 + w1 * t + w2 * t * t + rng.normal(0, 1e-3)]
            dfs = [w1 + rng.normal(0, 1e-2), w1 + 2 * w2 * t + rng.normal(0, 1e-2)]
            var_fs = [float(v) for v in rng.uniform(0.01, 1, 2)]
            var_dfs = [float(v) for v in rng.uniform(0.01, 1, 2)]
            var_fs[int(rng.integers(2))] = 0.0
            var_dfs[int(rng.integers(2))] = 0.0
            with pytest.warns(RuntimeWarning, match="variance of"):
                got = alpha(t, *fs, *var_fs, *dfs, *var_dfs)
            exact = exact_alpha(t, fs, dfs, var_fs, var_dfs)
            assert got == pytest.approx(exact, rel=1e-11, abs=1e-12), (t, got, exact)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_alpha_from_samples_on_sgd_step(model_name):
    """One SGD step of a real net: our α equals Cockpit's (fallback path) re-derived."""
    kind = "ce_mean"
    model, params, grads0, G0, losses0, (x0, y0) = case_data(model_name, kind)
    lr = 0.5
    g0 = G0.mean(0)
    step = {k: -lr * v.mean(0) for k, v in grads0.items()}  # SGD: d = −lr g
    params1 = {k: params[k] + step[k] for k in params}
    x1, y1 = make_batch(model_name, kind, N, seed=11)  # end point uses a new batch
    losses1, grads1 = per_sample(model, params1, kind, x1, y1)
    G1 = torch.cat([g.reshape(N, -1) for g in grads1.values()], dim=1)

    d = torch.cat([s.reshape(-1) for s in step.values()])
    tau = float(d.norm())
    u = d / tau
    got = alpha_from_samples(tau, losses0, losses1, G0 @ u, G1 @ u)

    # Cockpit: f = batch loss, var_f = losses.var(); df = ∇L·d/‖d‖ (p.grad),
    # var_df = np.var(projections, ddof=1)
    fs = [float(losses0.mean()), float(losses1.mean())]
    var_fs = [float(losses0.var()), float(losses1.var())]
    dfs = [float(g0 @ d) / tau, float(G1.mean(0) @ d) / tau]
    var_dfs = [
        float(np.var((G0 @ d / tau).numpy(), ddof=1)),
        float(np.var((G1 @ d / tau).numpy(), ddof=1)),
    ]
    ref = cockpit_alpha(tau, fs, dfs, var_fs, var_dfs)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert dfs[0] == pytest.approx(-float(g0.norm()), rel=1e-12)  # descent: df0 = −‖g‖


# -------------------------------------------------------------------- histograms


def np_hist_clamped(values: np.ndarray, bins: int, rng: tuple[float, float]):
    clipped = np.clip(values[~np.isnan(values)], rng[0], rng[1])
    return np.histogram(clipped, bins=bins, range=rng)


def tricky_values(lo: float, hi: float, bins: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    edges = np.linspace(lo, hi, bins + 1)
    parts = [
        torch.randn(3000, generator=gen, dtype=torch.float64) * (hi - lo) / 3,
        torch.from_numpy(edges),  # exactly on every edge, incl. lo and hi
        torch.from_numpy(np.nextafter(edges, -np.inf)),
        torch.from_numpy(np.nextafter(edges, np.inf)),
        torch.tensor([-math.inf, math.inf, lo - 1e3, hi + 1e3], dtype=torch.float64),
    ]
    return torch.cat(parts)


@pytest.mark.parametrize("bins,rng", [(100, (-2.0, 2.0)), (7, (-0.3, 1.1)), (40, (-1.0, 1.0))])
def test_hist_1d_matches_numpy_on_clamped_entries(bins, rng):
    values = tricky_values(*rng, bins, seed=bins)
    counts, edges = hist_1d(values, bins=bins, range=rng)
    ref_counts, ref_edges = np_hist_clamped(values.numpy(), bins, rng)
    assert counts.dtype == torch.float64 and edges.dtype == torch.float64
    np.testing.assert_array_equal(edges.numpy(), ref_edges)
    np.testing.assert_array_equal(counts.numpy(), ref_counts.astype(np.float64))
    assert float(counts.sum()) == values.numel()
    # right edge inclusive, outliers in the edge bins
    c_hi, _ = hist_1d(torch.tensor([rng[1], 1e9]), bins=bins, range=rng)
    assert float(c_hi[-1]) == 2.0
    c_lo, _ = hist_1d(torch.tensor([rng[0], -1e9, -math.inf]), bins=bins, range=rng)
    assert float(c_lo[0]) == 3.0


def test_hist_1d_nan_and_pieces_add_up():
    values = torch.tensor([0.1, math.nan, 3.0, -0.5], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="NaN"):
        counts, _ = hist_1d(values, bins=4, range=(-1, 1))
    assert counts.tolist() == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        hist_1d(values, bins=0)
    with pytest.raises(ValueError):
        hist_1d(values, bins=3, range=(1.0, 1.0))


@pytest.mark.parametrize("model_name,kind", CASES)
def test_histograms_of_individual_gradients(model_name, kind):
    model, params, grads, G, _, _ = case_data(model_name, kind)
    # 1D: layer by layer equals all at once equals numpy on clamped entries
    counts, _ = hist_1d(list(grads.values()))
    layerwise = sum(hist_1d(v)[0] for v in grads.values())
    ref, _ = np_hist_clamped(G.reshape(-1).numpy(), 100, (-2.0, 2.0))
    np.testing.assert_array_equal(counts.numpy(), ref)
    np.testing.assert_array_equal(layerwise.numpy(), ref)

    # 2D: (individual gradient entry, parameter value), parameter broadcast over N
    total = torch.zeros(40, 50, dtype=torch.float64)
    ref_total = np.zeros((40, 50))
    for name, gb in grads.items():
        p = params[name]
        c2, (xe, ye) = hist_2d(gb, p)
        total += c2
        xs = np.clip(gb.reshape(-1).numpy(), -1.0, 1.0)
        ys = np.clip(p.expand_as(gb).reshape(-1).numpy(), -2.0, 2.0)
        r2, rxe, rye = np.histogram2d(xs, ys, bins=(40, 50), range=((-1, 1), (-2, 2)))
        np.testing.assert_array_equal(c2.numpy(), r2)
        np.testing.assert_array_equal(xe.numpy(), rxe)
        np.testing.assert_array_equal(ye.numpy(), rye)
        ref_total += r2
    np.testing.assert_array_equal(total.numpy(), ref_total)
    assert float(total.sum()) == G.numel()


def test_hist_2d_edges_outliers_and_nan():
    xr, yr = (-1.0, 1.0), (-2.0, 2.0)
    x = tricky_values(*xr, 40, seed=1)
    y = tricky_values(*yr, 50, seed=2)[: x.numel()]
    y = y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(0))]
    counts, _ = hist_2d(x, y)
    ref, _, _ = np.histogram2d(
        np.clip(x.numpy(), *xr), np.clip(y.numpy(), *yr), bins=(40, 50), range=(xr, yr)
    )
    np.testing.assert_array_equal(counts.numpy(), ref)
    corner, _ = hist_2d(torch.tensor([1.0, 5.0]), torch.tensor([-9.0, -2.0]))
    assert float(corner[-1, 0]) == 2.0
    with pytest.warns(RuntimeWarning, match="NaN"):
        c, _ = hist_2d(torch.tensor([0.0, math.nan]), torch.tensor([math.nan, 0.5]))
    assert float(c.sum()) == 0.0


def test_histograms_reproduce_cockpit_binning():
    """Cockpit's own binning (histc after clamp; 2D centre clamp + floor) agrees."""
    gen = torch.Generator().manual_seed(9)
    v = torch.randn(20000, generator=gen, dtype=torch.float64) * 1.5
    # GradHist1d._compute_histogram: clamp to [start, end], torch.histc
    cockpit_1d = torch.histc(torch.clamp(v, -2, 2), bins=100, min=-2, max=2)
    counts, edges = hist_1d(v)
    np.testing.assert_array_equal(counts.numpy(), cockpit_1d.numpy())
    torch.testing.assert_close(edges, torch.linspace(-2, 2, 101, dtype=torch.float64))
    assert float((edges - bin_edges(100, (-2, 2))).abs().max()) == 0.0

    # GradHist2d: clamp to bin centres of the edge bins, then histogram2d's floor index
    x = torch.randn(20000, generator=gen, dtype=torch.float64) * 0.8
    y = torch.randn(20000, generator=gen, dtype=torch.float64) * 1.5
    (xmin, xmax), (ymin, ymax), (xb, yb) = (-1, 1), (-2, 2), (40, 50)
    wx, wy = (xmax - xmin) / xb, (ymax - ymin) / yb
    xc = torch.clamp(x, min=xmin + wx / 2, max=xmax - wx / 2)
    yc = torch.clamp(y, min=ymin + wy / 2, max=ymax - wy / 2)
    idx = yb * ((xc - xmin) / wx).long() + ((yc - ymin) / wy).long()
    cockpit_2d = torch.zeros(xb * yb, dtype=torch.int64)
    cockpit_2d.put_(idx, torch.ones_like(idx), accumulate=True)
    counts2, _ = hist_2d(x, y)
    np.testing.assert_array_equal(counts2.numpy(), cockpit_2d.reshape(xb, yb).numpy())


def test_tic_warns_once_per_run_about_nonpositive_curvature():
    """A dead input leaves zeros in the diagonal at every step: one warning, not one per step."""
    import warnings

    from cockpit import Cockpit

    torch.manual_seed(0)
    model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    x[:, 0] = 0.0  # the Hessian diagonal of weight column 0 is exactly 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Cockpit(model, loss_fn, opt, ["tic_diag", "tic_trace"]) as cockpit:
            for step in range(4):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                with cockpit.step(step, loss):
                    loss.backward()
                opt.step()
    tic = [str(w.message) for w in caught if str(w.message).startswith("TIC:")]
    assert len(tic) == 1, tic
    assert "tic_diag reports this once" in tic[0] and "step 0" in tic[0]
