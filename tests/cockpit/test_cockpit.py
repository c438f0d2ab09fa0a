"""Every instrument, read back from the Parquet log, against its formula on explicit
float64 per-sample gradients (torch.func), with SGD (momentum, weight decay) and Adam."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cockpit import Cockpit, schedules
from cockpit.logreader import read_histograms, read_log
from instruments.alpha import alpha_from_samples
from instruments.gradient_tests import (
    INNER_TEST_THRESHOLD,
    NORM_TEST_THRESHOLD,
    ORTHO_TEST_THRESHOLD,
)
from tests import models
from tests.reference import hist1d, hist2d, per_sample_grads_func

NAMES = [
    "loss",
    "grad_norm",
    "distance",
    "update_size",
    "norm_test",
    "inner_test",
    "ortho_test",
    "mean_gsnr",
    "early_stopping",
    "cabs",
    "alpha",
    "batch_size",
    "grad_hist_1d",
    "grad_hist_2d",
    "hyperparameters",
]


pytestmark = pytest.mark.usefixtures("float64")


def individual_losses(model, loss_fn, x, y):
    return torch.stack([loss_fn(model(x[n : n + 1]), y[n : n + 1]).detach() for n in range(len(x))])


def flat(d):
    return torch.cat([t.reshape(t.shape[0], -1) if t.dim() > 0 else t for t in d.values()], -1)


def run(model, make_opt, x_batches, y_batches, tmp_path, steps=4):
    loss_fn = nn.CrossEntropyLoss()
    opt = make_opt(model.parameters())
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    thetas, batches = [], []
    logdir = tmp_path / "run"
    with Cockpit(model, loss_fn, opt, instruments=NAMES, logdir=logdir) as cockpit:
        for step in range(steps):
            x, y = x_batches[step % len(x_batches)], y_batches[step % len(y_batches)]
            thetas.append({k: p.detach().clone() for k, p in model.named_parameters()})
            batches.append((x, y))
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with cockpit.step(step, loss):
                loss.backward()
            opt.step()
    thetas.append({k: p.detach().clone() for k, p in model.named_parameters()})
    return loss_fn, theta0, thetas, batches, read_log(logdir), read_histograms(logdir)


def reference(model, loss_fn, theta, x, y):
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(theta[k])
    g = per_sample_grads_func(model, loss_fn, x, y)
    return g, individual_losses(model, loss_fn, x, y)


def value(df, step, instrument, metric=None, param="all"):
    sel = df[
        (df.step == step)
        & (df.instrument == instrument)
        & (df.metric == (metric or instrument))
        & (df.param == param)
    ]
    assert len(sel) == 1, (step, instrument, metric, param, len(sel))
    return float(sel.value.iloc[0])


def close(a, b, what):
    if math.isnan(b):
        assert math.isnan(a), what
    else:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), what


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
}
MODELS = {
    "mlp": (models.mlp, (6,)),
    "cnn": (models.cnn, (2, 8, 8)),
    "resnet": (models.ResNet, (2, 6, 6)),
}


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("arch", MODELS)
def test_every_instrument_matches_its_formula(arch, opt, tmp_path):
    make_model, shape = MODELS[arch]
    model = make_model()
    xs = [torch.randn(6, *shape) for _ in range(2)]
    ys = [torch.randint(0, 3, (6,)) for _ in range(2)]
    steps = 4
    loss_fn, theta0, thetas, batches, df, hist = run(
        model, OPTIMIZERS[opt], xs, ys, tmp_path, steps
    )
    names = [k for k, p in model.named_parameters()]
    refs = [reference(model, loss_fn, thetas[t], *batches[t]) for t in range(steps)]
    for t in range(steps):
        g, losses = refs[t]
        n = len(losses)
        G = flat(g)
        gbar = G.mean(0)
        L = float(losses.mean())
        close(value(df, t, "loss"), L, "loss")
        close(value(df, t, "grad_norm"), float(gbar.norm()), "grad_norm")
        d0 = flat({k: (thetas[t][k] - theta0[k])[None] for k in names})
        close(value(df, t, "distance"), float(d0.norm()), "distance")
        delta = {k: thetas[t + 1][k] - thetas[t][k] for k in names}
        D = flat({k: v[None] for k, v in delta.items()})[0]
        close(value(df, t, "update_size"), float(D.norm()), "update_size")
        for k in names:
            close(value(df, t, "update_size", param=k), float(delta[k].norm()), f"update_size {k}")
            close(value(df, t, "grad_norm", param=k), float(g[k].mean(0).norm()), f"grad_norm {k}")
        # gradient tests, written from their definitions
        l2 = (G**2).sum(1)
        dots = G @ gbar
        gn2 = float(gbar @ gbar)
        norm_t = math.sqrt(float(l2.sum() - n * gn2) / (n * (n - 1) * gn2))
        inner_t = math.sqrt(float((dots**2).sum() - n * gn2**2) / (n * (n - 1) * gn2**2))
        ortho_t = math.sqrt(float((l2 - dots**2 / gn2).sum()) / (n * (n - 1) * gn2))
        close(value(df, t, "norm_test"), norm_t, "norm_test")
        close(value(df, t, "inner_test"), inner_t, "inner_test")
        close(value(df, t, "ortho_test"), ortho_t, "ortho_test")
        for k in names:  # per tensor
            Gk = g[k].reshape(n, -1)
            gk = Gk.mean(0)
            nk = math.sqrt(float((Gk**2).sum() - n * gk @ gk) / (n * (n - 1) * float(gk @ gk)))
            close(value(df, t, "norm_test", param=k), nk, f"norm_test {k}")
        close(
            value(df, t, "batch_size", "norm_test"), n * (norm_t / NORM_TEST_THRESHOLD) ** 2, "bs"
        )
        close(
            value(df, t, "batch_size", "inner_test"),
            n * (inner_t / INNER_TEST_THRESHOLD) ** 2,
            "bs",
        )
        close(
            value(df, t, "batch_size", "ortho_test"),
            n * (ortho_t / ORTHO_TEST_THRESHOLD) ** 2,
            "bs",
        )
        m2 = (G**2).mean(0)
        gsnr = float((gbar**2 / (m2 - gbar**2 + 1e-5)).mean())
        close(value(df, t, "mean_gsnr"), gsnr, "mean_gsnr")
        s2 = ((G**2).sum(0) - n * gbar**2) / (n - 1)
        eb = 1 - n * float((gbar**2 / (s2 + 1e-5)).mean())
        close(value(df, t, "early_stopping"), eb, "early_stopping")
        lr_eff = float(-(D @ gbar) / gn2)
        cabs = lr_eff * float(((G - gbar) ** 2).sum(1).mean()) / L
        close(value(df, t, "cabs", "lr_eff"), lr_eff, "lr_eff")
        close(value(df, t, "cabs"), cabs, "cabs")
        if t + 1 < steps:
            u = D / D.norm()
            g1, losses1 = refs[t + 1]
            a = alpha_from_samples(float(D.norm()), losses, losses1, G @ u, flat(g1) @ u)
            close(value(df, t, "alpha"), a, "alpha")
        else:
            assert df[(df.step == t) & (df.instrument == "alpha")].empty
        lr = opt == "sgd" and 0.1 or 0.01
        close(value(df, t, "hyperparameters", "lr", "group0"), lr, "lr")
        close(value(df, t, "hyperparameters", "batch_size"), n, "batch size")
        # histograms, model-wide and per tensor
        h1 = hist[(hist.step == t) & (hist.instrument == "grad_hist_1d")].set_index("param")
        np.testing.assert_array_equal(h1.loc["all", "counts"], hist1d(G, 100, -2.0, 2.0).numpy())
        for k in names:
            np.testing.assert_array_equal(h1.loc[k, "counts"], hist1d(g[k], 100, -2.0, 2.0).numpy())
        h2 = hist[(hist.step == t) & (hist.instrument == "grad_hist_2d")].set_index("param")
        from cockpit.quantities import Hist2D

        q = Hist2D()
        theta_flat = flat({k: thetas[t][k][None] for k in names})
        np.testing.assert_array_equal(
            h2.loc["all", "counts"], hist2d(G, theta_flat.expand_as(G), q).numpy()
        )
        np.testing.assert_array_equal(h2.loc["all", "edges_0"], np.linspace(-1, 1, 41))


def _train(cockpit, model, loss_fn, opt, x, y, steps) -> None:
    """A plain training loop over one batch with every step passed to the cockpit."""
    for step in steps:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        with cockpit.step(step, loss):
            loss.backward()
        opt.step()


def test_schedules_skip_steps_and_count_engine_passes(tmp_path):
    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    cockpit = Cockpit(model, loss_fn, opt, instruments="economy", schedule=schedules.every(3))
    passes = []
    original = cockpit.engine.gather

    def counting(*a, **kw):
        passes.append(cockpit._last_step)
        return original(*a, **kw)

    cockpit.engine.gather = counting
    _train(cockpit, model, loss_fn, opt, x, y, range(7))
    cockpit.close()
    # tracked: 0, 3, 6; alpha's end points: 1, 4 (step 7 never came)
    assert passes == [0, 1, 3, 4, 6]


def test_a_preset_in_a_list_with_an_override_gathers_what_the_override_needs(tmp_path):
    from cockpit.quantities import DiagGGN, DiagHessian
    from instruments import PRESETS, get

    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    mc_trace = get("hess_trace", curvature="ggn_mc")
    insts = ["business", mc_trace, get("tic_diag", curvature="ggn_mc"), "grad_hist_2d"]
    cockpit = Cockpit(model, loss_fn, opt, instruments=insts, logdir=tmp_path / "run")
    names = [i.name for i in cockpit.instruments]
    assert names == [*PRESETS["business"], "grad_hist_2d"]
    assert cockpit.instruments[names.index("hess_trace")] is mc_trace
    requested = []
    original = cockpit.engine.gather

    def recording(quantities, *a, **kw):
        requested.append(set(quantities))
        return original(quantities, *a, **kw)

    cockpit.engine.gather = recording
    _train(cockpit, model, loss_fn, opt, x, y, range(2))
    cockpit.close()
    assert DiagGGN(mc_samples=1) in requested[0]
    assert not any(isinstance(q, DiagHessian) for q in requested[0])
    assert not any(isinstance(q, DiagGGN) and q.mc_samples == 0 for q in requested[0])
    with pytest.raises(ValueError, match="'loss' given twice"):
        Cockpit(model, loss_fn, opt, instruments=["economy", "loss", "loss"])


@pytest.mark.parametrize("preset", ["full", ["business", "hess_max_ev", "grad_hist_2d"]])
def test_the_cockpit_never_draws_from_the_global_random_generator(tmp_path, preset):
    """Tracked steps leave torch's global RNG where a plain step leaves it.

    Otherwise attaching a cockpit would change the user's dropout masks and data order.
    Lanczos' start vector and restarts, Hutchinson probes and Monte-Carlo targets all draw
    from the engine's own generators.
    """
    from instruments import get

    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    insts = preset if isinstance(preset, str) else [*preset, get("hess_trace", curvature="ggn_mc")]
    with Cockpit(model, loss_fn, opt, instruments=insts, logdir=tmp_path / "run") as cockpit:
        torch.manual_seed(11)
        _train(cockpit, model, loss_fn, opt, x, y, range(3))
        after = torch.get_rng_state()
    torch.manual_seed(11)
    assert torch.equal(after, torch.get_rng_state()), "a tracked step drew from the global RNG"


def test_a_second_run_into_the_same_logdir_must_continue_after_its_steps(tmp_path):
    from cockpit.logreader import read_log

    run = tmp_path / "run"
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def train(steps):
        torch.manual_seed(0)
        model = models.mlp()
        loss_fn = nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Cockpit(model, loss_fn, opt, instruments=["loss"], logdir=run) as cockpit:
            _train(cockpit, model, loss_fn, opt, x, y, steps)

    train(range(3))
    with pytest.raises(ValueError, match=r"already holds steps up to 2 .* new logdir"):
        train(range(3))  # the same script again: never two runs mixed in one log
    train(range(3, 5))  # resuming after step 2 continues the run
    steps = read_log(run).query("instrument == 'loss'").step.tolist()
    assert steps == [0, 1, 2, 3, 4]


def test_step_must_increase_and_model_must_not_change():
    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with Cockpit(model, loss_fn, opt, instruments=["loss"]) as cockpit:
        loss = loss_fn(model(x), y)
        with cockpit.step(3, loss):
            loss.backward()
        with pytest.raises(ValueError, match="does not increase"):
            with cockpit.step(3, loss):
                pass
        model.add_module("extra", nn.Linear(3, 3))
        with pytest.raises(ValueError, match="parameters changed"):
            with cockpit.step(4, loss):
                pass


def test_nonfinite_loss_logs_nan_and_warns_once():
    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with Cockpit(model, loss_fn, opt, instruments="economy") as cockpit:
        with pytest.warns(RuntimeWarning, match="not finite"):
            for step in range(2):
                opt.zero_grad()
                loss = loss_fn(model(x), y) * float("nan")
                with cockpit.step(step, loss):
                    loss.backward()
        assert math.isnan(cockpit.latest()["norm_test"])


def test_gradient_accumulation_is_refused_on_tracked_steps():
    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with Cockpit(model, loss_fn, opt, instruments="economy") as cockpit:
        loss_fn(model(x), y).backward()  # a micro-batch accumulated without a step
        loss = loss_fn(model(x), y)
        with pytest.raises(ValueError, match="accumulation"):
            with cockpit.step(0, loss):
                loss.backward()


def test_validation_passes_in_between_are_ignored():
    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with Cockpit(model, loss_fn, opt, instruments="economy") as cockpit:
        for step in range(3):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with cockpit.step(step, loss):
                loss.backward()
            opt.step()
            with torch.no_grad():
                loss_fn(model(torch.randn(9, 6)), torch.randint(0, 3, (9,)))
            cockpit.log(step, val_loss=1.0)
        assert cockpit.latest()["hyperparameters.batch_size"] == 5
