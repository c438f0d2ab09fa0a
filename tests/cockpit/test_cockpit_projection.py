"""Alpha's start-point projections: engine factors kept from the backward pass vs jvp.

``Gathered.project`` (the default) must equal the forward-mode reference
``⟨∂L/∂f_n, J_θ f_n u⟩`` at θ_t (``cockpit.cockpit.FORCE_JVP``) on every architecture,
and must refuse (fall back) when a kept tensor was changed in place by the optimizer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import cockpit.cockpit as cockpit_module
from cockpit import Cockpit
from cockpit.quantities import Gathered
from tests import models

pytestmark = pytest.mark.usefixtures("float64")


class PooledTransformer(nn.Module):
    """TinyTransformer averaged over positions: [N, C] logits for a plain CE loss."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = models.TinyTransformer()

    def forward(self, idx):
        return self.inner(idx).mean(1)


class PooledTiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = models.TiedLM()

    def forward(self, idx):
        return self.inner(idx).mean(1)


class Codes(nn.Module):
    """Learned per-sample inputs (auto-decoder latent codes) as a module."""

    def __init__(self) -> None:
        super().__init__()
        self.codes = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        return self.codes * 1.0


class ParamInput(nn.Module):
    """A Linear whose input is a parameter itself: SGD changes it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.codes = Codes()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.lin(self.codes.codes) * x + self.codes(x))


CASES = {
    "mlp": (models.mlp, lambda: torch.randn(7, 6), 3),
    "cnn": (models.cnn, lambda: torch.randn(5, 2, 8, 8), 3),
    "resnet": (models.ResNet, lambda: torch.randn(4, 2, 6, 6), 3),
    "transformer": (PooledTransformer, lambda: torch.randint(0, 11, (4, 5)), 4),
    "tied_lm": (PooledTiedLM, lambda: torch.randint(0, 9, (3, 4)), 9),
    "twice_used": (models.TwiceUsed, lambda: torch.randn(6, 4), 2),
    "param_input": (ParamInput, lambda: torch.randn(6, 4), 3),
}


def alphas(
    build, inputs, classes, force_jvp: bool, monkeypatch, instruments=("alpha",), kinds=None
) -> list[bool]:
    """Train 4 steps with alpha; returns, per projection call, whether factors were used.

    ``kinds`` (a dict), if given, collects the type name of each parameter's kept factor.
    """
    monkeypatch.setattr(cockpit_module, "FORCE_JVP", force_jvp)
    calls = []
    real = Gathered.project

    def counting(self, u):
        if kinds is not None:
            kinds.update({name: type(f).__name__ for name, (f, _, _) in self.kept.items()})
        out = real(self, u)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(Gathered, "project", counting)
    torch.manual_seed(1)
    model = build()
    data = [(inputs(), torch.randint(0, classes, (inputs().shape[0],))) for _ in range(4)]
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback-rule notices
        with Cockpit(model, loss_fn, opt, list(instruments)) as ck:
            for step, (x, y) in enumerate(data):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                with ck.step(step, loss):
                    loss.backward()
                opt.step()
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_kept_factors_equal_forward_mode(case, monkeypatch):
    _check_against_forward_mode(case, monkeypatch, ("alpha",))


KEPT = {  # parameter: the factor kept with a 1D histogram requested
    "cnn": {"0.weight": "DenseFactor", "3.weight": "ConvFactor"},  # 3: G (540) > x, g (440)
    "resnet": {"stem.weight": "DenseFactor", "block2.conv2.weight": "DenseFactor"},
    "transformer": {
        "inner.encoder.linear1.weight": "DenseFactor",
        "inner.head.weight": "DenseFactor",
    },
}


@pytest.mark.parametrize("case", list(KEPT))
def test_kept_per_sample_gradients_equal_forward_mode(case, monkeypatch):
    # with a 1D histogram the per-sample gradients of layers with shared positions are
    # built whole anyway; where they are no larger than the layer's inputs and output
    # gradients, they are kept instead and projected in N·D multiply-adds
    kinds = _check_against_forward_mode(case, monkeypatch, ("alpha", "grad_hist_1d"))
    assert {name: kinds[name] for name in KEPT[case]} == KEPT[case]


def _check_against_forward_mode(case, monkeypatch, instruments) -> dict[str, str]:
    build, inputs, classes = CASES[case]
    results = {}
    used = {}
    kinds: dict[str, str] = {}
    for force in (False, True):
        seen = []
        monkeypatch.setattr(Cockpit, "_emit", _recording(Cockpit._emit, seen), raising=True)
        calls = alphas(build, inputs, classes, force, monkeypatch, instruments, kinds)
        results[force] = [(r.step, r.value) for r in seen if r.instrument == "alpha"]
        used[force] = calls
        monkeypatch.undo()
    _assert_same_alphas(results[False], results[True])
    assert used[True] == [], "FORCE_JVP never projects kept factors"
    if case == "param_input":
        assert used[False] and not any(used[False]), "in-place-changed inputs fall back to jvp"
    else:
        assert used[False] and all(used[False]), "kept factors are projected"
    return kinds


def _assert_same_alphas(fast, reference):
    assert len(fast) == 3 and [s for s, _ in fast] == [s for s, _ in reference]
    torch.testing.assert_close(
        torch.tensor([v for _, v in fast]),
        torch.tensor([v for _, v in reference]),
        rtol=1e-9,
        atol=1e-10,
    )


def _recording(emit, seen):
    def wrapper(self, records):
        records = list(records)
        seen.extend(r for r in records if hasattr(r, "value"))
        return emit(self, records)

    return wrapper


# ---------------------------------------------------------------- SGD's update predicted
SGD = {
    "plain": dict(lr=0.3),
    "momentum": dict(lr=0.3, momentum=0.9),
    "nesterov_decay": dict(lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.01),
    "dampening_maximize": dict(
        lr=0.1, momentum=0.5, dampening=0.3, weight_decay=0.02, maximize=True
    ),
}


def _alpha_run(monkeypatch, force_jvp, make_opt, reduction="mean", clip=None, build=None):
    """Alpha and the inner test on a small CNN for 4 steps: (alpha rows, update sources)."""
    monkeypatch.setattr(cockpit_module, "FORCE_JVP", force_jvp)
    seen = []
    monkeypatch.setattr(Cockpit, "_emit", _recording(Cockpit._emit, seen), raising=True)
    torch.manual_seed(1)
    model = (build or models.cnn)()
    data = [(torch.randn(5, 2, 8, 8), torch.randint(0, 3, (5,))) for _ in range(4)]
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    opt = make_opt(model.parameters())
    with Cockpit(model, loss_fn, opt, ["alpha", "inner_test"]) as ck:
        for step, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with ck.step(step, loss):
                loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        sources = dict(ck._update_sources)
    monkeypatch.undo()
    return [(r.step, r.value) for r in seen if r.instrument == "alpha"], sources


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("config", list(SGD))
def test_sgd_update_projections_equal_forward_mode(config, reduction, monkeypatch):
    # ⟨g_n, Δθ⟩ read off ⟨g_n, ∇L⟩ and the projections onto the momentum buffer and θ_t
    def make(params):
        return torch.optim.SGD(params, **SGD[config])

    fast, sources = _alpha_run(monkeypatch, False, make, reduction)
    reference, ref_sources = _alpha_run(monkeypatch, True, make, reduction)
    _assert_same_alphas(fast, reference)
    assert sources == {"sgd": 4}, "every step's projections come from the backward pass"
    assert ref_sources == {"jvp": 4}


def test_sgd_update_with_clipped_gradients_projects_kept_factors(monkeypatch):
    # clipping rescales ∇L in place after the pass: the prediction no longer holds
    def make(params):
        return torch.optim.SGD(params, lr=0.3, momentum=0.9)

    fast, sources = _alpha_run(monkeypatch, False, make, clip=1e-3)
    reference, _ = _alpha_run(monkeypatch, True, make, clip=1e-3)
    _assert_same_alphas(fast, reference)
    assert sources == {"factors": 4}


def test_other_optimizers_and_sgd_subclasses_project_kept_factors(monkeypatch):
    class MySGD(torch.optim.SGD):  # may step differently: never predicted
        pass

    for make in (
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: MySGD(p, lr=0.3),
    ):
        fast, sources = _alpha_run(monkeypatch, False, make)
        reference, _ = _alpha_run(monkeypatch, True, make)
        _assert_same_alphas(fast, reference)
        assert sources == {"factors": 4}


def test_sgd_update_that_does_not_match_the_prediction_falls_back(monkeypatch):
    # the step is checked against the prediction: a parameter moved by something else
    # after SGD's step (here, a post-step hook) makes the factors answer instead
    def make(params):
        opt = torch.optim.SGD(params, lr=0.3)
        first = opt.param_groups[0]["params"][0]
        opt.register_step_post_hook(lambda *_: first.data.mul_(0.999))
        return opt

    fast, sources = _alpha_run(monkeypatch, False, make)
    reference, _ = _alpha_run(monkeypatch, True, make)
    _assert_same_alphas(fast, reference)
    assert sources == {"factors": 4}
