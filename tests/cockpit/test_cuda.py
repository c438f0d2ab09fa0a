"""The engine, curvature and the Cockpit on CUDA, against the CPU float64 references.

Skipped without a GPU (CI has none). Each test runs the model on CUDA in float64 and
compares with the independent references of the CPU suite (``torch.func`` per-sample
gradients, explicit GGN/Hessian) evaluated on a CPU copy of the same model and batch, so
a device-specific bug (a tensor left on the CPU, a CPU generator for CUDA noise, a
host-side reduction in the wrong dtype) fails here with the parameter's name.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from cockpit import Cockpit, schedules
from cockpit.engine import Engine
from cockpit.linops import lanczos
from cockpit.logreader import read_histograms, read_log
from cockpit.quantities import (
    BatchL2,
    DiagGGN,
    DiagHessian,
)
from tests import models
from tests.cockpit.test_engine import check_model
from tests.curvature_reference import explicit_ggn, explicit_hessian, flatten, split

#: ``COCKPIT_TEST_DEVICE=cpu`` runs this module's logic on the CPU (a dry run of the test
#: code itself, for machines without a GPU); by default it needs CUDA and skips without.
CUDA = torch.device(os.environ.get("COCKPIT_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.skipif(
        CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
    pytest.mark.usefixtures("float64"),
]

TOL = dict(atol=1e-10, rtol=1e-10)


def _cpu(values):
    if isinstance(values, dict):
        return {k: v.detach().cpu() for k, v in values.items()}
    return values.detach().cpu()


def _first_order(model, loss_fn, x, y):
    """Every first-order quantity on CUDA against torch.func per-sample gradients on CPU."""
    check_model(model, loss_fn, x, y, device=CUDA)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_first_order_cnn(reduction):
    _first_order(
        models.cnn(),
        nn.CrossEntropyLoss(reduction=reduction),
        torch.randn(6, 2, 8, 8),
        torch.randint(0, 3, (6,)),
    )


def test_first_order_residual_groupnorm():
    _first_order(
        models.ResNet(), nn.CrossEntropyLoss(), torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    )


def test_first_order_transformer_sequence_outputs():
    # the wrapper owns `pos` directly: its parameters go through the torch.func fallback,
    # which this exercises on the device too (it warns once)
    model = models.TinyTransformer()
    x = torch.randint(0, 11, (4, 5))
    y = torch.randint(0, 4, (4,))

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, idx):
            return self.body(idx).mean(1)

    _first_order(Pooled(), nn.CrossEntropyLoss(), x, y)


def _curvature(model, loss_fn, x, y, quantity, explicit):
    expected = explicit(model, loss_fn, x, y).diagonal()
    gpu = copy.deepcopy(model).to(CUDA)
    with Engine(gpu, loss_fn) as engine:
        loss = loss_fn(gpu(x.to(CUDA)), y.to(CUDA))
        with engine.gather([quantity]) as result:
            loss.backward()
    assert result.exact[quantity] is True
    for name, value in split(expected, model).items():
        assert result[quantity][name].device.type == CUDA.type
        torch.testing.assert_close(_cpu(result[quantity][name]), value, **TOL, msg=name)
    torch.testing.assert_close(_cpu(result.total(quantity)), expected.sum(), **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diag_ggn_exact_cnn(reduction):
    _curvature(
        models.cnn(),
        nn.CrossEntropyLoss(reduction=reduction),
        torch.randn(5, 2, 8, 8),
        torch.randint(0, 3, (5,)),
        DiagGGN(),
        explicit_ggn,
    )


def test_diag_ggn_exact_residual_groupnorm_mse():
    _curvature(
        models.ResNet(),
        nn.MSELoss(),
        torch.randn(4, 2, 6, 6),
        torch.randn(4, 3),
        DiagGGN(),
        explicit_ggn,
    )


def test_diag_hessian_exact_tanh_mlp():
    model = nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 3)
    )
    _curvature(
        model,
        nn.CrossEntropyLoss(),
        torch.randn(6, 5),
        torch.randint(0, 3, (6,)),
        DiagHessian(),
        explicit_hessian,
    )


def test_mc_ggn_is_unbiased_on_cuda():
    """The mean of many CUDA Monte-Carlo draws converges to the exact diagonal GGN."""
    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    exact = explicit_ggn(model, loss_fn, x, y).diagonal()
    gpu = copy.deepcopy(model).to(CUDA)
    draws = []
    with Engine(gpu, loss_fn, seed=0) as engine:
        for _ in range(400):
            gpu.zero_grad()
            loss = loss_fn(gpu(x.to(CUDA)), y.to(CUDA))
            with engine.gather([DiagGGN(4)]) as result:
                loss.backward()
            draws.append(flatten(_cpu(result[DiagGGN(4)]), model))
    d = torch.stack(draws).cpu()
    sem = d.std(0) / math.sqrt(d.shape[0])
    # 5 standard errors per coordinate (exact coordinates have zero variance)
    assert ((d.mean(0) - exact).abs() <= 5 * sem + 1e-12).all()


def test_hessian_operator_lanczos_on_cuda():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    hess = explicit_hessian(model, loss_fn, x, y)
    top = torch.linalg.eigvalsh(hess)
    gpu = copy.deepcopy(model).to(CUDA)
    with Engine(gpu, loss_fn, seed=0) as engine:
        loss = loss_fn(gpu(x.to(CUDA)), y.to(CUDA))
        with engine.gather([BatchL2()]):
            loss.backward()
        op = engine.hessian_operator()
        torch.testing.assert_close((op @ torch.eye(op.shape[0], device=CUDA)).cpu(), hess, **TOL)
        res = lanczos(op, k=2, tol=1e-10, generator=engine.generator(op.device))
    assert res.converged
    want = top[top.abs().argsort(descending=True)][:2]
    torch.testing.assert_close(res.eigenvalues.cpu(), want, atol=1e-8, rtol=1e-8)


def _train_log(device, tmp_path, optimizer):
    torch.manual_seed(3)
    model = models.cnn().to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = optimizer(model.parameters())
    g = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(6, 2, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g))
        for _ in range(4)
    ]
    logdir = tmp_path / f"run-{torch.device(device).type}-{len(list(tmp_path.iterdir()))}"
    with Cockpit(
        model,
        loss_fn,
        opt,
        instruments=["business", "grad_hist_2d", "early_stopping", "cabs", "mean_gsnr"],
        logdir=logdir,
        schedule=schedules.every(1),
    ) as cockpit:
        for step, (x, y) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with cockpit.step(step, loss):
                loss.backward()
            opt.step()
        # distance keeps θ_0 on the parameters' device
        assert {t.device.type for t in cockpit._initial.values()} == {torch.device(device).type}
    return logdir


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=1e-2),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_cockpit_log_on_cuda_equals_cpu(tmp_path, optimizer):
    """Every scalar and histogram a CUDA run logs equals the CPU run's (checked elsewhere)."""
    cpu_dir = _train_log("cpu", tmp_path, optimizer)
    gpu_dir = _train_log(CUDA, tmp_path, optimizer)
    cpu, gpu = read_log(cpu_dir), read_log(gpu_dir)
    key = ["step", "instrument", "metric", "param"]
    merged = cpu.merge(gpu, on=key, how="outer", suffixes=("_cpu", "_gpu"), indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"][key]
    assert len(merged) > 100
    approx = merged["instrument"] == "hess_max_ev"
    exact = merged[~approx]
    a, b = exact["value_cpu"].to_numpy(), exact["value_gpu"].to_numpy()
    bad = ~(np.isclose(a, b, rtol=1e-8, atol=1e-12) | (np.isnan(a) & np.isnan(b)))
    assert not bad.any(), exact[bad][[*key, "value_cpu", "value_gpu"]]
    ev = merged[approx]
    np.testing.assert_allclose(ev["value_gpu"], ev["value_cpu"], rtol=2e-3)
    hc = read_histograms(cpu_dir).sort_values(["step", "instrument", "param"])
    hg = read_histograms(gpu_dir).sort_values(["step", "instrument", "param"])
    assert len(hc) == len(hg) > 0
    for (_, r1), (_, r2) in zip(hc.iterrows(), hg.iterrows(), strict=True):
        assert (r1["step"], r1["instrument"], r1["param"]) == (
            r2["step"],
            r2["instrument"],
            r2["param"],
        )
        np.testing.assert_array_equal(np.asarray(r1["counts"]), np.asarray(r2["counts"]))
