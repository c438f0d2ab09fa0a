"""Every first-order quantity against explicit float64 per-sample gradients."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from cockpit.engine import Engine
from cockpit.layers import UnsupportedModuleError
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
from tests import models
from tests.reference import (
    per_sample_grads_func,
    per_sample_grads_loop,
    quantity_from_grads,
    trainable,
)

TOL = dict(atol=1e-10, rtol=1e-10)


def all_quantities(scale: float = 1.0):
    return [
        BatchL2(),
        BatchDot(),
        SecondMoment(),
        GradDot(),
        Projection("u"),
        IndividualGradients(),
        Hist1D(bins=17, range=(-0.3 * scale, 0.3 * scale)),
        Hist2D(bins=(7, 9), range=((-0.2 * scale, 0.2 * scale), (-0.5, 0.5))),
    ]


def gather(model, loss_fn, x, y, quantities, directions=None):
    with Engine(model, loss_fn) as engine:
        loss = loss_fn(model(x), y)
        with engine.gather(quantities, directions=directions) as result:
            loss.backward()
    return result


def check_model(
    model, loss_fn, x, y, *, reference=per_sample_grads_func, hist_scale=1.0, device=None
):
    """Every first-order quantity of ``model`` against ``reference`` per-sample gradients.

    With ``device`` the engine runs on a copy of the model on that device (inputs and
    directions moved there); every result must stay on the device and match the CPU
    float64 reference, and the copy's ``p.grad`` must equal a plain CPU backward's.
    """
    torch.manual_seed(1)
    params = trainable(model)
    u = {k: torch.randn_like(p) for k, p in params.items()}
    qs = all_quantities(hist_scale)
    run = model if device is None else copy.deepcopy(model).to(device)
    to = (lambda t: t) if device is None else (lambda t: t.to(device))
    result = gather(run, loss_fn, to(x), to(y), qs, {"u": {k: to(v) for k, v in u.items()}})
    ref = reference(model, loss_fn, x, y)

    def host(value):
        if device is not None:
            assert value.device.type == torch.device(device).type, "a result left the device"
        return value.cpu()

    assert set(result[BatchL2()]) == set(ref), "every trainable parameter is covered"
    for q in qs:
        for name, g in ref.items():
            expected = quantity_from_grads(q, g, params[name].detach(), u[name])
            torch.testing.assert_close(host(result[q][name]), expected, **TOL, msg=f"{q} {name}")
    # model-wide totals
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in ref.values()], 1)
    torch.testing.assert_close(host(result.total(BatchL2())), (flat**2).sum(1), **TOL)
    torch.testing.assert_close(host(result.total(BatchDot())), flat @ flat.T, **TOL)
    torch.testing.assert_close(host(result.total(GradDot())), flat @ flat.mean(0), **TOL)
    if device is not None:  # p.grad on the device is what a plain backward gives
        plain = copy.deepcopy(model)
        loss_fn(plain(x), y).backward()
        for (name, p), q in zip(run.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad.cpu(), q.grad, **TOL, msg=f"grad {name}")
    return result, ref


pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp(reduction):
    model = models.mlp()
    check_model(
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        torch.randn(7, 6),
        torch.randint(0, 3, (7,)),
    )


def test_reference_func_equals_loop():
    model = models.ResNet()
    x, y = torch.randn(3, 2, 6, 6), torch.randint(0, 3, (3,))
    a = per_sample_grads_func(model, nn.CrossEntropyLoss(), x, y)
    b = per_sample_grads_loop(model, nn.CrossEntropyLoss(), x, y)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cnn_with_pooling(reduction):
    check_model(
        models.cnn(),
        nn.CrossEntropyLoss(reduction=reduction),
        torch.randn(5, 2, 8, 8),
        torch.randint(0, 3, (5,)),
    )


def test_residual_cnn_groupnorm():
    check_model(
        models.ResNet(), nn.CrossEntropyLoss(), torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    )


class SeqCE(nn.Module):
    """CE on [N, T, C] outputs, flattened as language models do."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction
        self.ce = nn.CrossEntropyLoss(reduction=reduction)

    def forward(self, out, y):
        return self.ce(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_transformer_encoder(reduction):
    model = models.TinyTransformer()
    with pytest.warns(UserWarning, match="TinyTransformer"):  # the positional parameter
        check_model(
            model, SeqCE(reduction), torch.randint(0, 11, (4, 5)), torch.randint(0, 4, (4, 5))
        )


def test_weight_tied_language_model():
    model = models.TiedLM()
    result, ref = check_model(
        model, SeqCE(), torch.randint(0, 9, (3, 4)), torch.randint(0, 9, (3, 4))
    )
    assert "head.weight" not in ref and "embed.weight" in result[BatchL2()]


def test_batchnorm_eval_cnn():
    check_model(
        models.bn_cnn(), nn.CrossEntropyLoss(), torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    )


def test_module_used_twice_and_frozen():
    model = models.TwiceUsed()
    result, ref = check_model(model, nn.MSELoss(), torch.randn(6, 4), torch.randn(6, 2))
    assert not any(k.startswith("frozen") for k in result[BatchL2()])


def test_single_sample():
    check_model(models.mlp(), nn.CrossEntropyLoss(), torch.randn(1, 6), torch.randint(0, 3, (1,)))


def test_input_requiring_grad_and_functional_ops():
    model = models.mlp()
    x = torch.randn(4, 6, requires_grad=True)
    check_model(model, nn.MSELoss(reduction="sum"), x, torch.randn(4, 3))


def test_grads_unchanged_and_hooks_removed():
    model = models.ResNet()
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y).backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    engine = Engine(model, loss_fn)
    loss = loss_fn(model(x), y)
    with engine.gather(all_quantities(), directions={"u": {}}):
        loss.backward()
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, plain[k]), k
    engine.close()
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks
    assert not any(vars(p).keys() - {"grad"} for p in model.parameters() if vars(p))


def test_idle_engine_does_nothing_and_untracked_step_is_plain():
    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with Engine(model, loss_fn) as engine:
        for _ in range(3):  # idle steps
            model.zero_grad()
            loss_fn(model(x), y).backward()
        loss = loss_fn(model(x), y)
        with engine.gather([BatchL2()]) as result:
            loss.backward()
    assert result[BatchL2()]["0.weight"].shape == (4,)


def test_no_memory_growth_over_many_steps():
    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    qs = all_quantities()
    with Engine(model, loss_fn) as engine:

        def step():
            model.zero_grad()
            loss = loss_fn(model(x), y)
            with engine.gather(qs, directions={"u": {}}):
                loss.backward()

        for _ in range(50):
            step()
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(1000):
            step()
        gc.collect()
        after = len(gc.get_objects())
    assert after - before < 200, f"objects grew by {after - before} over 1000 steps"


def test_batchnorm_train_mode_raises_naming_module():
    model = models.bn_cnn().train()
    loss_fn = nn.CrossEntropyLoss()
    with Engine(model, loss_fn) as engine:
        loss = loss_fn(model(torch.randn(4, 2, 6, 6)), torch.randint(0, 3, (4,)))
        with pytest.raises(UnsupportedModuleError, match=r"(?s)1: BatchNorm2d.*eval mode"):
            with engine.gather([BatchL2()]):
                loss.backward()
        # untracked steps with BN in train mode are fine
        model.zero_grad()
        loss_fn(model(torch.randn(4, 2, 6, 6)), torch.randint(0, 3, (4,))).backward()


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x * self.scale + self.scale**2


def test_unsupported_module_strict_raises_and_warn_mode_is_exact():
    model = nn.Sequential(nn.Linear(4, 3), Custom())
    with pytest.raises(UnsupportedModuleError, match=r"1 \(Custom\)"):
        Engine(model, nn.MSELoss(), fail_mode="error")
    with pytest.warns(UserWarning, match=r"1 \(Custom\)"):
        check_model(model, nn.MSELoss(), torch.randn(5, 4), torch.randn(5, 3))


class Codes(nn.Module):
    """Learned per-sample codes returned whole: the rows are samples, the input is unused."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.codes = nn.Parameter(torch.randn(n, d))

    def forward(self, x):
        return self.codes * 1.0


class CodesModel(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.codes = Codes(n, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(self.codes(x)) + x))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fallback_module_whose_rows_are_samples_but_not_its_inputs(reduction):
    # re-running Codes on one sample returns all N rows: the fallback reads sample n's
    # gradient off the batch call instead (it summed every row against g_n before)
    torch.manual_seed(0)
    n = 6
    model = CodesModel(n)
    x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    with pytest.warns(UserWarning, match=r"codes \(Codes\)"):
        result = gather(model, loss_fn, x, y, [IndividualGradients(), BatchL2()])
    params = dict(model.named_parameters())

    def sample_loss(p, i):  # l_n: row n of the batch call
        out = torch.func.functional_call(model, p, (x,))
        return nn.functional.cross_entropy(out[i : i + 1], y[i : i + 1])

    for name in params:
        ref = torch.stack([torch.func.grad(sample_loss)(params, i)[name] for i in range(n)])
        got = result[IndividualGradients()][name]
        torch.testing.assert_close(got, ref, **TOL, msg=name)
        torch.testing.assert_close(result[BatchL2()][name], (ref**2).flatten(1).sum(1), **TOL)


def test_parameter_fed_directly_to_a_module_warns_naming_both():
    class ParamInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.codes = Codes(5, 4)
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(self.codes.codes) * x + self.codes(x)[:, :3]

    model = ParamInput()
    with pytest.warns(UserWarning, match=r"'codes.codes' is an input of module 'lin'"):
        gather(model, nn.MSELoss(), torch.randn(5, 3), torch.randn(5, 3), [BatchL2()])


def test_gather_without_forward_or_backward_errors():
    model = models.mlp()
    loss_fn = nn.MSELoss()
    with Engine(model, loss_fn) as engine:
        with pytest.raises(RuntimeError, match="no forward pass"):
            with engine.gather([BatchL2()]):
                pass
        model(torch.randn(2, 6))
        with pytest.raises(RuntimeError, match="no backward pass"):
            with engine.gather([BatchL2()]):
                pass


def test_no_grad_forward_is_ignored():
    model = models.mlp()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with Engine(model, loss_fn) as engine:
        with torch.no_grad():
            model(torch.randn(9, 6))  # evaluation pass with another batch size
        loss = loss_fn(model(x), y)
        with engine.gather([BatchL2()]) as result:
            loss.backward()
    assert result.batch_size == 4


class _ConvTwice(nn.Module):
    """A convolution applied twice (its weight has two uses), then one applied once."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Conv2d(3, 3, 3, padding=1)
        self.once = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.twice(torch.tanh(self.twice(x))))
        return self.head(self.once(h).mean((2, 3)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_dot_reads_the_batch_gradient_off_the_convolution_node(reduction, monkeypatch):
    """⟨g_n, ḡ⟩ of a convolution with one use takes ḡ from the gradient its autograd
    node computes for the weight, so its per-sample gradients are built in chunks of
    samples; a convolution used twice computes ḡ from its per-sample gradients (chunks
    of rows). Both equal the reference, for both reductions."""
    import cockpit.factors as factors
    from cockpit.factors import MEAN_GRADIENT, AffineFactor

    torch.manual_seed(3)
    model = _ConvTwice()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    x, y = torch.randn(6, 3, 5, 5), torch.randint(0, 2, (6,))
    monkeypatch.setattr(factors, "CHUNK_ELEMENTS", 2 * 4 * 27)  # 2 samples of `once`
    monkeypatch.setattr(factors, "ROW_CHUNK_ELEMENTS", 2 * 4 * 27)
    rows, means = [], {}
    real_rows, real_materialized = AffineFactor.to_dense_rows, AffineFactor._materialized

    def to_dense_rows(self, lo, hi):
        rows.append(tuple(self.shape))
        return real_rows(self, lo, hi)

    def materialized(self, requests, param, directions):
        means[tuple(self.shape)] = directions.get(MEAN_GRADIENT)
        return real_materialized(self, requests, param, directions)

    monkeypatch.setattr(AffineFactor, "to_dense_rows", to_dense_rows)
    monkeypatch.setattr(AffineFactor, "_materialized", materialized)
    qs = [GradDot(), BatchL2(), SecondMoment()]
    result = gather(model, loss_fn, x, y, qs)
    ref = per_sample_grads_func(model, loss_fn, x, y)
    params = trainable(model)
    for q in qs:
        for name, g in ref.items():
            expected = quantity_from_grads(q, g, params[name].detach(), None)
            torch.testing.assert_close(result[q][name], expected, **TOL, msg=f"{q} {name}")
    once, twice = tuple(model.once.weight.shape), tuple(model.twice.weight.shape)
    scale = 1.0 if reduction == "mean" else 1 / 6  # ḡ = (1/N) Σ_n g_n either way
    torch.testing.assert_close(means[once], model.once.weight.grad * scale)
    assert means[twice] is None, "two uses: ḡ is not one node's gradient"
    assert once not in rows and twice in rows


def test_awaited_layer_whose_node_never_runs_is_processed_at_the_end():
    """A gradient taken with respect to a convolution's output stops before its node: the
    layer is still processed (with ḡ from its per-sample gradients) when the pass ends."""
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(4, 2, 5, 5)
    with Engine(conv, None) as engine:
        out = conv(x)
        loss = out.square().sum()
        with engine.gather([GradDot(), BatchL2()], reduction="sum") as result:
            (g,) = torch.autograd.grad(loss, out)
    a = torch.nn.functional.unfold(x, 3).transpose(1, 2)  # [N, S, I]
    grads = torch.einsum("nos,nsi->noi", g.flatten(2), a).flatten(1)  # [N, D] weight
    torch.testing.assert_close(result[BatchL2()]["weight"], (grads**2).sum(1), **TOL)
    torch.testing.assert_close(result[GradDot()]["weight"], grads @ grads.mean(0), **TOL)
