"""Curvature gathered in the user's backward pass against explicit float64 references."""

from __future__ import annotations

import doctest
import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cockpit.engine
import cockpit.factors
from cockpit.engine import Engine
from cockpit.layers import UnsupportedModuleError
from cockpit.linops import hutchinson_trace, lanczos
from cockpit.quantities import BatchL2, DiagGGN, DiagHessian, SecondMoment
from tests import models
from tests.curvature_reference import explicit_ggn, explicit_hessian, flatten, split

TOL = dict(atol=1e-10, rtol=1e-10)


pytestmark = pytest.mark.usefixtures("float64")


def gather(model, loss_fn, x, y, quantities, transform=None, seed=0, **engine_kw):
    with Engine(model, loss_fn, seed=seed, **engine_kw) as engine:
        out = model(x)
        loss = loss_fn(out if transform is None else transform(out), y)
        with engine.gather(quantities) as result:
            loss.backward()
    return result


def assert_diag(result, q, expected_flat, model):
    expected = split(expected_flat, model)
    assert set(result[q]) == set(expected), "every trainable parameter is covered"
    for name, value in expected.items():
        torch.testing.assert_close(result[q][name], value, **TOL, msg=f"{q} {name}")
    torch.testing.assert_close(result.total(q), expected_flat.sum(), **TOL)


def check_ggn(model, loss_fn, x, y, transform=None, **engine_kw):
    result = gather(model, loss_fn, x, y, [DiagGGN()], transform, **engine_kw)
    ggn = explicit_ggn(model, loss_fn, x, y, transform)
    assert_diag(result, DiagGGN(), ggn.diagonal(), model)
    assert result.exact[DiagGGN()] is True
    return result


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------


class SeqCE(nn.Module):
    """CE on [N, T, C] outputs, flattened inside the loss (a generic loss for the engine)."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction
        self.ce = nn.CrossEntropyLoss(reduction=reduction)

    def forward(self, out, y):
        return self.ce(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class SeqLM(nn.Module):
    """Embedding → Linear → Tanh module → Linear head on every position (untied)."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.act = nn.Tanh()
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.act(self.mix(self.embed(idx))))


class ResidualMLP(nn.Module):
    """Residual blocks h + tanh(W h) with nn.Tanh, and a GELU stem."""

    def __init__(self, d=4):
        super().__init__()
        self.stem = nn.Linear(3, d)
        self.gelu = nn.GELU()
        self.block1 = nn.Linear(d, d)
        self.block2 = nn.Linear(d, d)
        self.act1, self.act2 = nn.Tanh(), nn.Tanh()
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.gelu(self.stem(x))
        h = h + self.act1(self.block1(h))
        h = h + self.act2(self.block2(h))
        return self.head(h)


def chain(act: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))


class FunctionalTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x):
        logits = self.body(x)
        return {"logits": logits, "aux": logits.detach() * 0}


# ----------------------------------------------------------------------------------------
# diagonal GGN, exact
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_mlp_tanh(reduction):
    check_ggn(
        models.mlp(),
        nn.CrossEntropyLoss(reduction=reduction),
        torch.randn(7, 6),
        torch.randint(0, 3, (7,)),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_cnn_relu_pooling(reduction):
    check_ggn(
        models.cnn(),
        nn.CrossEntropyLoss(reduction=reduction),
        torch.randn(5, 2, 8, 8),
        torch.randint(0, 3, (5,)),
    )


def test_ggn_residual_cnn_groupnorm():
    check_ggn(
        models.ResNet(), nn.CrossEntropyLoss(), torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    )


def test_ggn_transformer_encoder():
    # Embedding, learned positions (torch.func fallback rule), attention, LayerNorm
    check_ggn(
        models.TinyTransformer(),
        SeqCE(),
        torch.randint(0, 11, (3, 5)),
        torch.randint(0, 4, (3, 5)),
        fail_mode="silent",
    )


@pytest.mark.parametrize(
    "layout, loss_fn",
    [
        ("flat", nn.CrossEntropyLoss()),
        ("flat", nn.CrossEntropyLoss(reduction="sum", ignore_index=2)),
        ("NCT", nn.CrossEntropyLoss(reduction="sum")),
        ("NCT", nn.CrossEntropyLoss(label_smoothing=0.2, ignore_index=1)),
        ("NTC-generic", SeqCE("mean")),
    ],
)
def test_ggn_language_model_sequence_outputs(layout, loss_fn):
    model = SeqLM()
    x = torch.randint(0, 7, (3, 4))
    y = torch.randint(0, 7, (3, 4))
    if layout == "flat":  # [N·T, C] rows, the usual LM layout
        check_ggn(model, loss_fn, x, y.reshape(-1), lambda o: o.reshape(-1, o.shape[-1]))
    elif layout == "NCT":  # torch's [N, C, T] layout for CE
        check_ggn(model, loss_fn, x, y, lambda o: o.transpose(1, 2))
    else:
        check_ggn(model, loss_fn, x, y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_weight_tied_language_model(reduction):
    model = models.TiedLM()
    result = check_ggn(
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        torch.randint(0, 9, (3, 4)),
        torch.randint(0, 9, (12,)),
        lambda o: o.reshape(-1, o.shape[-1]),
    )
    assert "head.weight" not in result[DiagGGN()]


def test_ggn_module_used_twice_frozen_and_bn_eval():
    result = check_ggn(models.TwiceUsed(), nn.MSELoss(), torch.randn(6, 4), torch.randn(6, 2))
    assert not any(k.startswith("frozen") for k in result[DiagGGN()])
    check_ggn(
        models.bn_cnn(), nn.CrossEntropyLoss(), torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    )


class CoupledLoss(nn.Module):
    """A generic loss with a dense, convex per-sample Hessian block."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, out, target):
        per = torch.logsumexp(out, 1) - (out * target).sum(1) + 0.5 * out.sum(1) ** 2
        return per.mean() if self.reduction == "mean" else per.sum()


LOSSES = {
    "ce_weighted_ignore": (
        lambda r: nn.CrossEntropyLoss(
            weight=torch.tensor([0.3, 1.0, 2.0]), ignore_index=1, reduction=r
        ),
        lambda n: torch.randint(0, 3, (n,)),
    ),
    "ce_label_smoothing": (
        lambda r: nn.CrossEntropyLoss(label_smoothing=0.1, reduction=r),
        lambda n: torch.randint(0, 3, (n,)),
    ),
    "ce_probabilities": (
        lambda r: nn.CrossEntropyLoss(reduction=r),
        lambda n: torch.softmax(torch.randn(n, 3), 1),
    ),
    "mse": (lambda r: nn.MSELoss(reduction=r), lambda n: torch.randn(n, 3)),
    "bce_with_logits": (
        lambda r: nn.BCEWithLogitsLoss(
            weight=torch.tensor([1.0, 0.5, 2.0]),
            pos_weight=torch.tensor([2.0, 1.0, 0.5]),
            reduction=r,
        ),
        lambda n: torch.rand(n, 3).round(),
    ),
    "generic_huber": (lambda r: nn.HuberLoss(reduction=r, delta=0.7), lambda n: torch.randn(n, 3)),
    "generic_coupled": (lambda r: CoupledLoss(r), lambda n: torch.softmax(torch.randn(n, 3), 1)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_ggn_every_loss(loss, reduction):
    make_loss, make_target = LOSSES[loss]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*round-off.*")
        check_ggn(models.mlp(), make_loss(reduction), torch.randn(6, 6), make_target(6))


# ----------------------------------------------------------------------------------------
# diagonal GGN, Monte-Carlo
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn, target, m",
    [
        (nn.CrossEntropyLoss(), lambda: torch.randint(0, 3, (5,)), 1),
        (nn.MSELoss(reduction="sum"), lambda: torch.randn(5, 3), 2),
        (nn.BCEWithLogitsLoss(), lambda: torch.rand(5, 3), 2),
    ],
)
def test_mc_ggn_is_unbiased(loss_fn, target, m):
    model = models.mlp()
    x, y = torch.randn(5, 6), target()
    exact = explicit_ggn(model, loss_fn, x, y).diagonal()
    draws = 200
    with Engine(model, loss_fn, seed=3) as engine:
        samples = []
        for _ in range(draws):
            loss = loss_fn(model(x), y)
            with engine.gather([DiagGGN(m)]) as result:
                loss.backward()
            assert result.exact[DiagGGN(m)] is False
            samples.append(flatten(result[DiagGGN(m)], model))
            model.zero_grad()
    samples = torch.stack(samples)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(draws)
    assert (samples.std(0) > 0).any(), "the draws differ"
    z = (mean - exact).abs() / (se + 1e-12)
    assert z.max() < 5, f"max z-score {z.max():.2f}"
    # the same check rejects a 20% bias
    z_biased = (mean - 1.2 * exact).abs() / (se + 1e-12)
    assert z_biased.max() > 5


def test_mc_seed_reproducible_and_settable():
    model, loss_fn = models.mlp(), nn.CrossEntropyLoss()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def draw(engine):
        loss = loss_fn(model(x), y)
        with engine.gather([DiagGGN(1)]) as result:
            loss.backward()
        model.zero_grad()
        return flatten(result[DiagGGN(1)], model)

    rng_before = torch.get_rng_state()
    with Engine(model, loss_fn, seed=7) as a, warnings.catch_warnings():
        first = [draw(a), draw(a)]
        a.manual_seed(7)
        again = draw(a)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global generator is untouched"
    with Engine(model, loss_fn, seed=7) as b:
        same = draw(b)
    with Engine(model, loss_fn, seed=8) as c:
        other = draw(c)
    assert torch.equal(first[0], same) and torch.equal(first[0], again)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], other)


# ----------------------------------------------------------------------------------------
# diagonal Hessian
# ----------------------------------------------------------------------------------------


def check_hessian(model, loss_fn, x, y, transform=None, q=None):
    q = q or DiagHessian()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no fallback warning
        result = gather(model, loss_fn, x, y, [q, DiagGGN()], transform)
    hess = explicit_hessian(model, loss_fn, x, y, transform)
    assert_diag(result, q, hess.diagonal(), model)
    assert result.exact[q] is True
    torch.testing.assert_close(result.total(q), hess.trace(), **TOL)
    return result


@pytest.mark.parametrize(
    "act",
    [
        nn.Tanh(),
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        nn.SiLU(),
        nn.Softplus(beta=2.0),
        nn.ELU(alpha=0.7),
        nn.CELU(),
        nn.SELU(),
        nn.Mish(),
        nn.LogSigmoid(),
        nn.Hardswish(),
    ],
    ids=lambda m: repr(m),
)
def test_hessian_exact_activation_chains(act):
    check_hessian(
        chain(act), nn.CrossEntropyLoss(), torch.randn(6, 3) * 2, torch.randint(0, 2, (6,))
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hessian_exact_residual_mlp(reduction):
    result = check_hessian(
        ResidualMLP(), nn.MSELoss(reduction=reduction), torch.randn(5, 3), torch.randn(5, 2)
    )
    # the residual terms matter here: the Hessian differs from the GGN
    h, g = result.total(DiagHessian()), result.total(DiagGGN())
    assert not torch.allclose(h, g)


def test_hessian_exact_conv_tanh_bce():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)
    )
    check_hessian(model, nn.BCEWithLogitsLoss(), torch.randn(4, 2, 4, 4), torch.rand(4, 3))


def test_wide_convolutions_square_one_column_with_the_grouped_kernel(monkeypatch):
    """One loss column (a single BCE logit) through convolutions wide enough for the
    grouped weight-gradient kernel: squared per-sample gradients in chunks of samples,
    without unfolding the input, equal the explicit GGN and Hessian diagonals."""
    import cockpit.layers.conv as conv_rules
    from cockpit.layers.conv import ColumnConvFactor

    monkeypatch.setattr(conv_rules, "GROUPED_MIN_POSITIONS", 64)  # the path under test

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 8·8 = 64 output positions
        nn.Tanh(),
        nn.Conv2d(4, 2, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 64, 1),
    )
    x, y = torch.randn(3, 1, 8, 8), torch.rand(3, 1)
    squares = []
    real = ColumnConvFactor.sum_of_squares
    monkeypatch.setattr(
        ColumnConvFactor, "sum_of_squares", lambda f, w=None: squares.append(f) or real(f, w)
    )
    monkeypatch.setattr(cockpit.factors, "CHUNK_ELEMENTS", 300)  # one sample a chunk
    check_ggn(model, nn.BCEWithLogitsLoss(), x, y)
    assert len(squares) >= 2 and all("a" not in vars(f.factor) for f in squares), "no patches"
    check_hessian(model, nn.BCEWithLogitsLoss(), x, y)


def test_hessian_equals_ggn_for_piecewise_linear_nets():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.LeakyReLU(),
        nn.Flatten(),
        nn.Linear(2, 3),
    )
    result = check_hessian(
        model, nn.CrossEntropyLoss(), torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
    )
    for name, value in result[DiagGGN()].items():
        assert torch.equal(result[DiagHessian()][name], value)


def _hutchinson_bound(hess, probes):
    """5 standard deviations of the Hutchinson diagonal: Var_j = Σ_{i≠j} H_ij² / K."""
    off = hess - torch.diag(hess.diagonal())
    return 5 * (off.square().sum(1) / probes).sqrt() + 1e-10


@pytest.mark.parametrize(
    "make_model, d_in, match",
    [
        (FunctionalTanh, 3, r"TanhBackward0.*use nn\.Tanh"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), 3, "LayerNorm"),
        (models.TwiceUsed, 4, "same parameter"),
    ],
    ids=["functional_tanh", "layernorm", "used_twice"],
)
def test_hessian_falls_back_to_hutchinson_with_warning(make_model, d_in, match):
    model = make_model()
    x = torch.randn(5, d_in)
    loss_fn = nn.CrossEntropyLoss()
    y = torch.randint(0, 2, (5,))
    probes = 500
    q = DiagHessian(probes=probes)
    with pytest.warns(UserWarning, match=rf"(?s)not provably exact.*{match}.*Hutchinson"):
        result = gather(model, loss_fn, x, y, [q])
    assert result.exact[q] is False and "Hutchinson" in result.notes[q]
    hess = explicit_hessian(model, loss_fn, x, y)
    est = flatten(result[q], model)
    bound = _hutchinson_bound(hess, probes)
    assert ((est - hess.diagonal()).abs() <= bound).all()
    # and the estimate is not the GGN in disguise
    ggn = explicit_ggn(model, loss_fn, x, y).diagonal()
    assert not torch.allclose(hess.diagonal(), ggn)


def test_hessian_residual_budget_forces_fallback():
    model = chain(nn.Tanh())
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.warns(UserWarning, match="residual_budget"):
        result = gather(model, nn.CrossEntropyLoss(), x, y, [DiagHessian(residual_budget=10)])
    assert result.exact[DiagHessian(residual_budget=10)] is False


# ----------------------------------------------------------------------------------------
# Hessian operator, trace, Lanczos
# ----------------------------------------------------------------------------------------


def record_step(model, loss_fn, x, y, engine, quantities=()):
    loss = loss_fn(model(x), y)
    with engine.gather(list(quantities) or [BatchL2()]) as result:
        loss.backward()
    return loss, result


def test_hessian_operator_trace_and_lanczos_match_explicit():
    model, loss_fn = ResidualMLP(), nn.CrossEntropyLoss()
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    hess = explicit_hessian(model, loss_fn, x, y)
    evals = torch.linalg.eigvalsh(hess)
    top = evals[evals.abs().argsort(descending=True)]
    with Engine(model, loss_fn, seed=0) as engine:
        _, result = record_step(model, loss_fn, x, y, engine, [DiagHessian()])
        op = engine.hessian_operator()
        torch.testing.assert_close(op @ torch.eye(op.shape[0]), hess, **TOL)
        torch.testing.assert_close(result.total(DiagHessian()), hess.trace(), **TOL)
        est = hutchinson_trace(op, 1000, engine.generator())
        off = hess - torch.diag(hess.diagonal())
        assert abs(est - hess.trace()) < 5 * math.sqrt(2 * off.square().sum() / 1000)
        for k in (1, 3):
            res = lanczos(op, k=k, tol=1e-10, generator=engine.generator())
            assert res.converged
            torch.testing.assert_close(res.eigenvalues, top[:k], atol=1e-8, rtol=1e-8)
            vecs = res.eigenvectors
            torch.testing.assert_close(op @ vecs, vecs * res.eigenvalues, atol=1e-5, rtol=0)
        capped = lanczos(op, k=1, tol=1e-12, max_iter=2, generator=engine.generator())
        assert not capped.converged and capped.num_matvecs == 2


def test_lanczos_warm_start_converges_faster():
    model, loss_fn = models.cnn(), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cold_counts, warm_counts = [], []
    with Engine(model, loss_fn, seed=0) as engine:
        prev = None
        for _ in range(4):
            opt.zero_grad()
            record_step(model, loss_fn, x, y, engine)
            op = engine.hessian_operator()
            cold = lanczos(op, k=1, tol=1e-3, generator=torch.Generator().manual_seed(1))
            assert cold.converged
            if prev is not None:
                warm = lanczos(op, k=1, tol=1e-3, v0=prev)
                assert warm.converged
                torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-3, atol=0)
                cold_counts.append(cold.num_matvecs)
                warm_counts.append(warm.num_matvecs)
            prev = cold.eigenvectors[:, 0]
            del op
            opt.step()
    assert sum(warm_counts) < sum(cold_counts), (warm_counts, cold_counts)


def test_hessian_operator_replays_dropout_and_leaves_buffers():
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2))
    model_bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with Engine(model, loss_fn) as engine:
        state = torch.get_rng_state()
        loss, _ = record_step(model, loss_fn, x, y, engine)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            op = engine.hessian_operator()
            assert torch.equal(op.loss_value, loss.detach())
        with torch.random.fork_rng():
            torch.set_rng_state(state)
            hess = explicit_hessian(model, loss_fn, x, y)
        torch.testing.assert_close(op @ torch.eye(op.shape[0]), hess, **TOL)
    with Engine(model_bn, loss_fn) as engine:  # BatchNorm in train mode: HVPs are defined
        loss = loss_fn(model_bn(x), y)
        loss.backward()
        mean = model_bn[1].running_mean.clone()
        op = engine.hessian_operator()
        assert torch.equal(op.loss_value, loss.detach())
        op @ torch.ones(op.shape[0])
        assert torch.equal(model_bn[1].running_mean, mean)


def test_no_reference_cycle_warning_and_no_memory_growth():
    model, loss_fn = ResidualMLP(), nn.CrossEntropyLoss()
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    qs = [DiagGGN(1), DiagHessian(), SecondMoment()]
    with Engine(model, loss_fn, seed=0) as engine, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prev = None

        def step():
            nonlocal prev
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with engine.gather(qs):
                loss.backward()
            op = engine.hessian_operator()
            res = lanczos(op, k=1, max_iter=3, v0=prev)
            prev = res.eigenvectors[:, 0]
            hutchinson_trace(op, 2)
            opt.step()

        for _ in range(10):
            step()
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(60):
            step()
        gc.collect()
        after = len(gc.get_objects())
    assert after - before < 40, f"objects grew by {after - before} over 60 steps"
    assert not [w for w in caught if "reference cycle" in str(w.message)]
    # the check would see the warning that backward(create_graph=True) gives
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn(model(x), y).backward(create_graph=True)
    assert [w for w in caught if "reference cycle" in str(w.message)]
    for p in model.parameters():
        p.grad = None


# ----------------------------------------------------------------------------------------
# errors, gradients untouched
# ----------------------------------------------------------------------------------------


def test_batchnorm_train_mode_raises():
    model = models.bn_cnn().train()
    loss_fn = nn.CrossEntropyLoss()
    with Engine(model, loss_fn) as engine:
        loss = loss_fn(model(torch.randn(4, 2, 6, 6)), torch.randint(0, 3, (4,)))
        with pytest.raises(UnsupportedModuleError, match=r"(?s)BatchNorm2d.*eval mode"):
            with engine.gather([DiagGGN()]):
                loss.backward()


def test_unsupported_loss_and_missing_loss_module_raise():
    model = models.mlp()
    x = torch.randn(4, 6)
    loss_fn = nn.MSELoss(reduction="none")
    with Engine(model, loss_fn) as engine:
        loss = loss_fn(model(x), torch.randn(4, 3)).sum()
        with pytest.raises(ValueError, match=r"'none'.*MSELoss"):
            with engine.gather([DiagGGN()]):
                loss.backward()
    with Engine(model) as engine:
        loss = F.mse_loss(model(x), torch.randn(4, 3))
        with pytest.raises(ValueError, match="loss_fn"):
            with engine.gather([DiagGGN()], reduction="mean"):
                loss.backward()


def test_model_output_not_a_tensor():
    model, loss_fn = DictOut(), nn.CrossEntropyLoss()
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with Engine(model, loss_fn) as engine:
        # the loss on one of the returned tensors: everything works
        loss = loss_fn(model(x)["logits"], y)
        with engine.gather([DiagGGN()]) as result:
            loss.backward()
        hess = explicit_hessian(model, loss_fn, x, y, lambda o: o["logits"])
        op = engine.hessian_operator()
        torch.testing.assert_close(op @ torch.eye(op.shape[0]), hess, **TOL)
        assert set(result[DiagGGN()]) == {k for k, _ in model.named_parameters()}
        # the loss on something derived from the outputs: the Hessian operator cannot
        # re-evaluate it, and says why
        model.zero_grad()
        loss = loss_fn(model(x)["logits"] * 2, y)
        loss.backward()
        with pytest.raises(ValueError, match=r"model returned a dict holding 2 tensor"):
            engine.hessian_operator()


def test_grads_unchanged_by_curvature():
    model = models.ResNet()
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss()
    out = model(x)
    loss_fn(out, y).backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    with Engine(model, loss_fn) as engine:
        seen = []  # a hook registered after the engine's on the model output (as Cockpit does)

        def foreign(module, args, output):
            output.register_hook(lambda g: seen.append((engine.in_curvature_pass, g)))

        model.register_forward_hook(foreign)
        loss = loss_fn(model(x), y)
        with pytest.warns(UserWarning, match="Hutchinson"):
            with engine.gather([DiagGGN(), DiagGGN(2), DiagHessian(probes=4), BatchL2()]):
                loss.backward()
        for k, p in model.named_parameters():
            assert torch.equal(p.grad, plain[k]), k
    # it also fired during the nested curvature passes, flagged, and saw the loss gradient last
    assert [flag for flag, _ in seen[:-1]] == [True] * (len(seen) - 1) and len(seen) > 1
    assert seen[-1][0] is False
    expected = torch.softmax(out, 1).sub(F.one_hot(y, 3)).div(4)  # d(mean CE)/d logits
    torch.testing.assert_close(seen[-1][1], expected.detach(), **TOL)


def test_engine_doctests():
    failures, tried = doctest.testmod(cockpit.engine)
    assert tried > 0 and failures == 0
