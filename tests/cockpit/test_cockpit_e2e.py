"""End-to-end tests through the public ``Cockpit`` API (issue 5, "Tests").

- Alpha on exact quadratics: a linear model with an MSE-type loss is exactly quadratic
  in θ, so the minimum along any step is known from the explicit Hessian. Real optimizer
  steps (SGD, Adam) are sized to reach 0, ½, 1, 2, 3 times the distance to that minimum,
  and the logged α must be −1, −½, 0, +1, +2. Also the degenerate cases that
  ``instruments/alpha.py`` defines: a zero step (−1), zero curvature along the step
  (−1), a flat direction with zero slope and zero curvature (NaN), negative curvature
  along the step (−1).
- A small CNN trained on scikit-learn's digits for 50 steps with the ``full`` preset,
  read back from its Parquet log.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from cockpit import Cockpit, schedules
from cockpit.logreader import read_histograms, read_log, read_meta
from instruments import PRESETS


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine, two torch threads competing with
    other processes made the digits test 20x slower (5 s → 90 s under load 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- helpers


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def loss_gradient_hessian(model, loss_fn, x, y):
    """``L(θ)``, ``∇L`` and the explicit Hessian of the batch loss at the model's θ."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(v):
        params, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            params[k] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    theta = flat_params(model)
    value = f(theta).detach()
    grad = torch.func.grad(f)(theta).detach()
    hess = torch.autograd.functional.hessian(f, theta).detach()
    return float(value), grad, hess


def line_minimum(grad, hess, u):
    """Slope, curvature and minimizer of the quadratic ``L(θ + x u)`` (curvature > 0)."""
    slope, curv = float(grad @ u), float(u @ hess @ u)
    return slope, curv, -slope / curv


def alpha_rows(logdir) -> dict[int, float]:
    df = read_log(logdir, instruments="alpha")
    assert set(df.metric) == {"alpha"} and set(df.param) == {"all"}
    assert df.step.is_unique
    return dict(zip(df.step.astype(int), df.value.astype(float), strict=True))


class LinearLoss(nn.Module):
    """``l_n = Σ_c f_nc y_nc``: linear in the output (zero curvature for a linear model)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, output, target):
        terms = output * target
        return {"none": terms, "mean": terms.mean(), "sum": terms.sum()}[self.reduction]


class NegativeMSE(nn.Module):
    """``l_n = 5 − Σ_c (f_nc − y_nc)²``: concave in the output."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, output, target):
        terms = 5.0 - (output - target) ** 2
        return {"none": terms, "mean": terms.mean(), "sum": terms.sum()}[self.reduction]


def train_full_batch(model, loss_fn, opt, x, y, set_lr, steps, logdir):
    """Full-batch loop through the public API; ``set_lr(step)`` may set the lr before
    ``opt.step()``. Returns ``latest()`` after each step and the parameters θ_0 … θ_steps."""
    latest, thetas = [], [flat_params(model)]
    with Cockpit(model, loss_fn, opt, instruments=["alpha"], logdir=logdir) as cockpit:
        for step in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with cockpit.step(step, loss):
                loss.backward()
            set_lr(step)
            opt.step()
            thetas.append(flat_params(model))
            latest.append(cockpit.latest())
    return latest, thetas


# -------------------------------------------------------------------- alpha, exact


FACTORS = [1.0, 2.0, 0.5, 3.0, 1e-3, 1.0]
"""Step length as a multiple of the distance to the line minimum; α = factor − 1."""


def test_alpha_sgd_on_exact_quadratic(float64, tmp_path):
    """SGD steps of ``k`` times the distance to the minimum along −g give α = k − 1."""
    n, d_in, d_out = 12, 4, 2
    model = nn.Linear(d_in, d_out)
    loss_fn = nn.MSELoss()
    x, y = torch.randn(n, d_in), torch.randn(n, d_out)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    expected = {}

    def set_lr(step):
        if step == len(FACTORS):  # the last step only provides alpha's end point
            return
        _, g, h = loss_gradient_hessian(model, loss_fn, x, y)
        assert torch.linalg.eigvalsh(h).min() > 0  # strictly convex: one line minimum
        u = -g / g.norm()
        _, _, x_min = line_minimum(g, h, u)
        # SGD: τ = lr ‖g‖; choose τ = k · x_min, i.e. lr = k · x_min / ‖g‖
        opt.param_groups[0]["lr"] = FACTORS[step] * x_min / float(g.norm())
        expected[step] = FACTORS[step] - 1.0

    latest, _ = train_full_batch(
        model, loss_fn, opt, x, y, set_lr, len(FACTORS) + 1, tmp_path / "sgd"
    )
    got = alpha_rows(tmp_path / "sgd")
    assert sorted(got) == list(range(len(FACTORS)))  # the last step has no end point
    for step, value in got.items():
        assert value == pytest.approx(expected[step], abs=1e-12), step
        # alpha of step t is computed (and shown by latest()) during step t+1
        assert latest[step + 1]["alpha"] == value
    assert "alpha" not in latest[0]


def test_alpha_adam_on_exact_quadratic(float64, tmp_path):
    """Adam: α from the actual update θ_{t+1} − θ_t, against the explicit line minimum.

    Adam's direction does not depend on the learning rate, so the lr is chosen from
    Adam's own update rule (replayed from its state) to step ``k`` times the distance to
    the minimum along that direction; α = k − 1, and also ``τ / x_min − 1`` computed
    from the actual update, whatever the replay says.
    """
    n, d_in, d_out = 10, 3, 2
    model = nn.Linear(d_in, d_out)
    loss_fn = nn.MSELoss()
    x, y = torch.randn(n, d_in), torch.randn(n, d_out)
    opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    expected, curvature = {}, {}

    def set_lr(step):
        if step == len(FACTORS):
            return
        _, g, h = loss_gradient_hessian(model, loss_fn, x, y)
        beta1, beta2 = opt.param_groups[0]["betas"]
        eps = opt.param_groups[0]["eps"]
        parts = []
        for p in model.parameters():
            state = opt.state.get(p, {})
            m = state.get("exp_avg", torch.zeros_like(p))
            v = state.get("exp_avg_sq", torch.zeros_like(p))
            t = int(state["step"]) + 1 if "step" in state else 1
            m = beta1 * m + (1 - beta1) * p.grad
            v = beta2 * v + (1 - beta2) * p.grad**2
            m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
            parts.append((-m_hat / (v_hat.sqrt() + eps)).reshape(-1))
        direction = torch.cat(parts)  # the update per unit learning rate
        u = direction / direction.norm()
        slope, curv, x_min = line_minimum(g, h, u)
        assert slope < 0 < curv
        opt.param_groups[0]["lr"] = FACTORS[step] * x_min / float(direction.norm())
        expected[step] = FACTORS[step] - 1.0
        curvature[step] = (g, h)

    latest, thetas = train_full_batch(
        model, loss_fn, opt, x, y, set_lr, len(FACTORS) + 1, tmp_path / "adam"
    )
    got = alpha_rows(tmp_path / "adam")
    assert sorted(got) == list(range(len(FACTORS)))
    for step, value in got.items():
        # independent of the replay: the actual update and the explicit quadratic
        d = thetas[step + 1] - thetas[step]
        tau = float(d.norm())
        g, h = curvature[step]
        _, _, x_min = line_minimum(g, h, d / tau)
        assert value == pytest.approx(tau / x_min - 1.0, abs=1e-12), step
        assert value == pytest.approx(expected[step], abs=1e-12), step
        assert latest[step + 1]["alpha"] == value


# --------------------------------------------------------------- alpha, degenerate


def test_alpha_zero_step_is_minus_one(float64, tmp_path):
    """A step that does not move (lr = 0): the fit is singular; Cockpit's value −1."""
    model = nn.Linear(3, 1)
    loss_fn = nn.MSELoss()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest, _ = train_full_batch(
            model, loss_fn, opt, x, y, lambda step: None, 2, tmp_path / "zero"
        )
    messages = {str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)}
    # both projections are all zero (u = 0 by convention): floored variance, then τ = 0
    assert messages == {
        "The variance of df is 0, using 1e-10 instead.",
        "The two observations were at the same point; alpha = -1.",
    }
    assert alpha_rows(tmp_path / "zero") == {0: -1.0}
    assert latest[1]["alpha"] == -1.0


def test_alpha_zero_curvature_along_the_step_is_minus_one(float64, tmp_path):
    """A loss linear in θ (slope ≠ 0, curvature 0): the fit's x_min is at infinity, α = −1."""
    model = nn.Linear(3, 2)
    loss_fn = LinearLoss()
    x, y = torch.randn(9, 3), torch.randn(9, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    _, g, h = loss_gradient_hessian(model, loss_fn, x, y)
    assert float(h.abs().max()) == 0.0 and float(g.norm()) > 0
    latest, _ = train_full_batch(model, loss_fn, opt, x, y, lambda step: None, 3, tmp_path / "lin")
    got = alpha_rows(tmp_path / "lin")
    assert sorted(got) == [0, 1]
    for step, value in got.items():
        assert value == pytest.approx(-1.0, abs=1e-12), step
        assert latest[step + 1]["alpha"] == value


def test_alpha_flat_direction_is_undefined(float64, tmp_path):
    """A step in the Hessian's null space along which the loss does not change at all
    (slope and curvature 0): the fitted parabola is constant, α is undefined (NaN)."""

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.live = nn.Linear(3, 1)
            self.dead = nn.Linear(2, 1, bias=False)  # its input is always zero

        def forward(self, x):
            return self.live(x[:, :3]) + self.dead(x[:, 3:])

    model = TwoInputs()
    loss_fn = nn.MSELoss()
    x = torch.cat([torch.randn(8, 3), torch.zeros(8, 2)], 1)
    y = torch.randn(8, 1)
    # only weight decay moves the dead weights; the live ones stay put
    opt = torch.optim.SGD(
        [
            {"params": model.live.parameters(), "lr": 0.0},
            {"params": model.dead.parameters(), "lr": 0.1, "weight_decay": 1.0},
        ]
    )
    _, g, h = loss_gradient_hessian(model, loss_fn, x, y)
    d = -0.1 * model.dead.weight.detach().reshape(-1)
    d = torch.cat([torch.zeros(4), d])
    assert float(d.norm()) > 0
    assert float((h @ d).abs().max()) == 0.0 and float(g @ d) == 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest, thetas = train_full_batch(
            model, loss_fn, opt, x, y, lambda step: None, 2, tmp_path / "flat"
        )
    torch.testing.assert_close(thetas[1] - thetas[0], d, rtol=1e-12, atol=1e-15)
    assert any("variance of df is 0" in str(w.message) for w in caught)
    got = alpha_rows(tmp_path / "flat")
    assert list(got) == [0] and math.isnan(got[0])
    assert math.isnan(latest[1]["alpha"])


def test_alpha_negative_curvature_along_the_step_is_minus_one(float64, tmp_path):
    """Concave along the step (w2 < 0): no minimum ahead; α = −1 by definition."""
    model = nn.Linear(3, 2)
    loss_fn = NegativeMSE()
    x, y = torch.randn(9, 3), torch.randn(9, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    curvatures = []

    def set_lr(step):
        _, g, h = loss_gradient_hessian(model, loss_fn, x, y)
        u = -g / g.norm()
        curvatures.append(float(u @ h @ u))

    latest, _ = train_full_batch(model, loss_fn, opt, x, y, set_lr, 3, tmp_path / "concave")
    assert max(curvatures) < 0
    got = alpha_rows(tmp_path / "concave")
    assert got == {0: -1.0, 1: -1.0}
    assert latest[1]["alpha"] == latest[2]["alpha"] == -1.0


# ------------------------------------------------- CNN on digits, full preset, read back

PER_TENSOR = {
    # instrument: metrics logged model-wide *and* per parameter tensor
    "distance": {"distance"},
    "grad_norm": {"grad_norm"},
    "update_size": {"update_size"},
    "norm_test": {"norm_test"},
    "inner_test": {"inner_test"},
    "ortho_test": {"ortho_test"},
    "hess_trace": {"hess_trace"},
    "tic_diag": {"tic_diag"},
}
MODEL_WIDE = {
    # instrument: metrics logged with param="all" only
    "loss": {"loss"},
    "alpha": {"alpha"},
    "batch_size": {"norm_test", "inner_test", "ortho_test"},
    "hess_trace": {"exact"},
    "hess_max_ev": {"hess_max_ev", "converged", "num_hvps"},
    "hyperparameters": {"batch_size"},
}
GROUP_WIDE = {"hyperparameters": {"lr", "momentum", "weight_decay"}}  # param="group0"
HISTOGRAMS = {
    "grad_hist_1d": ((100,), [(-2.0, 2.0)]),
    "grad_hist_2d": ((40, 50), [(-1, 1), (-2, 2)]),
}
STEPS, BATCH, LR, MOMENTUM = 50, 32, 0.1, 0.9


def digits_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def digits_data():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return (x - x.mean()) / x.std(), torch.tensor(labels)


@pytest.mark.parametrize(
    "schedule",
    [schedules.every(1), schedules.log_spaced(1, STEPS, 10)],
    ids=["every1", "log_spaced"],
)
def test_cnn_on_digits_full_preset_read_back_from_the_log(schedule, tmp_path):
    torch.manual_seed(0)
    x, y = digits_data()
    model = digits_cnn()
    names = [k for k, _ in model.named_parameters()]
    numel = {k: p.numel() for k, p in model.named_parameters()}
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    logdir = tmp_path / "digits-sgd"
    theta0 = flat_params(model).double()
    losses, thetas = [], [theta0]
    with warnings.catch_warnings():
        # dead ReLUs give zero curvature entries, which TIC warns about (MATH.md)
        warnings.filterwarnings("ignore", "TIC: the curvature has", RuntimeWarning)
        cockpit = Cockpit(model, loss_fn, opt, instruments="full", logdir=logdir, schedule=schedule)
        for step in range(STEPS):
            index = order[(step * BATCH) % len(x) :][:BATCH]
            opt.zero_grad()
            loss = loss_fn(model(x[index]), y[index])
            with cockpit.step(step, loss):
                loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            thetas.append(flat_params(model).double())
        latest = cockpit.latest()
        cockpit.close()
    assert losses[-1] < 0.5 * losses[0]  # it trains

    tracked = [s for s in range(STEPS) if schedule(s)]
    # alpha of step t needs the next cockpit.step call (step t+1, tracked or not)
    alpha_steps = [s for s in tracked if s + 1 < STEPS]
    df = read_log(logdir)
    hist = read_histograms(logdir)
    meta = read_meta(logdir)

    # --- metadata: the full preset with its schedule, the model, loss and optimizer
    assert [i["name"] for i in meta["instruments"]] == list(PRESETS["full"])
    assert all(i["schedule"] == schedule.config for i in meta["instruments"])
    assert [(m["name"], m["numel"]) for m in meta["model"]] == list(numel.items())
    assert meta["loss"] == {"class": "CrossEntropyLoss", "reduction": "mean"}
    assert meta["optimizer"]["class"] == "SGD"

    # --- every instrument of the preset appears, scalars and histograms
    assert set(df.instrument) | set(hist.instrument) == set(PRESETS["full"])
    assert set(df.instrument).isdisjoint(hist.instrument)
    assert not df.duplicated(["step", "instrument", "metric", "param"]).any()
    assert not hist.duplicated(["step", "instrument", "param"]).any()
    expected_params = {}
    for inst, metrics in PER_TENSOR.items():
        for metric in metrics:
            expected_params[inst, metric] = {"all", *names}
    for inst, metrics in MODEL_WIDE.items():
        for metric in metrics:
            expected_params[inst, metric] = {"all"}
    for inst, metrics in GROUP_WIDE.items():
        for metric in metrics:
            expected_params[inst, metric] = {"group0"}
    assert set(zip(df.instrument, df.metric, strict=True)) == set(expected_params)
    for (inst, metric), rows in df.groupby(["instrument", "metric"]):
        steps = alpha_steps if inst == "alpha" else tracked
        assert sorted(set(rows.step)) == steps, (inst, metric)
        for step, at_step in rows.groupby("step"):
            assert set(at_step.param) == expected_params[inst, metric], (inst, metric, step)

    # --- finite where they must be, and the values we can check from the loop
    assert np.isfinite(df.value).all(), df[~np.isfinite(df.value)]

    table: dict[tuple[str, str, str], dict[int, float]] = {}
    for row in df.itertuples():
        table.setdefault((row.instrument, row.metric, row.param), {})[int(row.step)] = row.value

    def scalars(inst, metric=None, param="all"):
        return table[inst, metric or inst, param]

    assert scalars("loss") == {s: losses[s] for s in tracked}
    for s, v in scalars("distance").items():
        assert v == pytest.approx(float((thetas[s] - theta0).norm()), rel=1e-6, abs=1e-12)
    for s, v in scalars("update_size").items():
        assert v == pytest.approx(float((thetas[s + 1] - thetas[s]).norm()), rel=1e-6)
    assert set(scalars("hyperparameters", "lr", "group0").values()) == {LR}
    assert set(scalars("hyperparameters", "momentum", "group0").values()) == {MOMENTUM}
    assert set(scalars("hyperparameters", "weight_decay", "group0").values()) == {0.0}
    assert set(scalars("hyperparameters", "batch_size").values()) == {BATCH}
    assert set(scalars("hess_trace", "exact").values()) == {1.0}  # ReLU net: diag Hessian exact
    assert set(scalars("hess_max_ev", "converged").values()) <= {0.0, 1.0}
    assert all(1 <= v <= 100 and v == int(v) for v in scalars("hess_max_ev", "num_hvps").values())
    assert all(v > 0 for v in scalars("hess_trace").values())
    for inst in ("norm_test", "inner_test", "ortho_test"):
        assert all(v >= 0 for v in scalars(inst).values())
    # model-wide norms and traces from the per-tensor rows
    for inst in ("distance", "grad_norm", "update_size"):
        for s, v in scalars(inst).items():
            parts = [scalars(inst, param=k)[s] for k in names]
            assert v == pytest.approx(math.sqrt(sum(p * p for p in parts)), rel=1e-9), inst
    for s, v in scalars("hess_trace").items():
        assert v == pytest.approx(sum(scalars("hess_trace", param=k)[s] for k in names), rel=1e-9)

    # --- histograms: shapes, edges, N·D counts, per-tensor counts add up to the total
    assert set(hist.param) == {"all", *names}
    for inst, (shape, ranges) in HISTOGRAMS.items():
        rows = hist[hist.instrument == inst]
        assert sorted(set(rows.step)) == tracked, inst
        for step, at_step in rows.groupby("step"):
            by_param = at_step.set_index("param")
            assert set(by_param.index) == {"all", *names}
            for k, row in by_param.iterrows():
                assert row["shape"] == shape and row["counts"].shape == shape
                d = sum(numel.values()) if k == "all" else numel[k]
                assert row["counts"].sum() == BATCH * d, (inst, step, k)
                for axis, (lo, hi) in enumerate(ranges):
                    edges = np.linspace(lo, hi, shape[axis] + 1)
                    np.testing.assert_array_equal(row[f"edges_{axis}"], edges)
                if len(shape) == 1:
                    assert len(row["edges_1"]) == 0
            total = sum(by_param.loc[k, "counts"] for k in names)
            np.testing.assert_array_equal(by_param.loc["all", "counts"], total)

    # --- the log's last model-wide values are what latest() returned
    last = {}
    for (inst, metric), rows in df[df.param == "all"].groupby(["instrument", "metric"]):
        row = rows.loc[rows.step.idxmax()]
        last[inst if metric == inst else f"{inst}.{metric}"] = (int(row.step), float(row.value))
    assert set(latest) == set(last)
    for key, (step, value) in last.items():
        assert step == (alpha_steps if key == "alpha" else tracked)[-1], key
        assert latest[key] == value, key
