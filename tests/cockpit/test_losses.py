"""Tests for cockpit.losses against independent float64 autograd computations."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from cockpit.losses import LossInfo, classify, hessian_sqrt, individual_losses

DT = torch.float64


# ----------------------------------------------------------------------------------------
# custom generic losses
# ----------------------------------------------------------------------------------------


def _reduce(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_element.mean() if reduction == "mean" else per_element.sum()


class CoupledSoftplusLoss(nn.Module):
    """Separable over the batch, dense (convex) Hessian block within a sample.

    Per sample: logsumexp(o) − o·t + ½ (Σ o)² + Σ softplus(o)². The unreduced form spreads
    the sample's term evenly over its elements so that reduction="mean" means "mean over
    elements" exactly like torch's losses.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        flat_o = output.reshape(output.shape[0], -1)
        flat_t = target.reshape(target.shape[0], -1)
        per_row = (
            torch.logsumexp(flat_o, 1)
            - (flat_o * flat_t).sum(1)
            + 0.5 * flat_o.sum(1) ** 2
            + (nn.functional.softplus(flat_o) ** 2).sum(1)
        )
        per_element = (per_row / flat_o.shape[1])[:, None].expand_as(flat_o).reshape_as(output)
        if self.reduction == "none":
            return per_element
        return _reduce(per_element, self.reduction)


class _Cube(torch.autograd.Function):
    """Old-style autograd.Function (no setup_context): unsupported by torch.func."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**4

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 4 * x**3 * grad


class QuarticFunctionLoss(nn.Module):
    """Elementwise (o − t)⁴ + (o − t)² via an old-style autograd.Function."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, output, target):
        d = output - target
        per_element = _Cube.apply(d) + d**2
        return per_element if self.reduction == "none" else _reduce(per_element, self.reduction)


class IndefiniteLoss(nn.Module):
    """Per sample o0² − o1² (not convex in the outputs)."""

    reduction = "sum"

    def forward(self, output, target):
        return (output[:, 0] ** 2 - output[:, 1] ** 2).sum()


class IgnoresReductionLoss(nn.Module):
    """Has reduction="mean" but sums: its unreduced copy cannot reproduce the loss."""

    def __init__(self):
        super().__init__()
        self.reduction = "mean"

    def forward(self, output, target):
        per_element = (output - target) ** 2
        return per_element if self.reduction == "none" else per_element.sum()


def plain_sum_of_squares(output, target):
    """A plain function loss (no reduction attribute)."""
    return ((output - target) ** 2).sum() + (output**4).sum()


# ----------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    make_loss: Callable[[str], Callable]
    make_data: Callable[[torch.Generator], tuple]  # -> output, target, batch_size
    kind: str
    exact_columns: Callable[[torch.Tensor], int]  # output -> expected K (exact)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def _rand(g, *shape):
    return torch.rand(*shape, generator=g, dtype=DT)


def _classes(g, c, *shape, ignore=None, frac=0.3):
    y = torch.randint(c, shape, generator=g)
    if ignore is not None:
        mask = torch.rand(shape, generator=g) < frac
        mask.view(-1)[0] = True  # at least one ignored
        y[mask] = ignore
    return y


W5 = torch.tensor([0.5, 2.0, 1.0, 0.3, 1.5], dtype=DT)
W4 = torch.tensor([1.5, 0.4, 1.0, 2.5], dtype=DT)
_W3 = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
_P3 = torch.tensor([3.0, 0.5, 1.0], dtype=DT)


def _ce(**kw):
    return lambda r: nn.CrossEntropyLoss(reduction=r, **kw)


CONFIGS = [
    Config(
        "ce_plain", _ce(), lambda g: (_randn(g, 4, 5), _classes(g, 5, 4), None), "ce", lambda o: 5
    ),
    Config(
        "ce_weight",
        _ce(weight=W5),
        lambda g: (_randn(g, 4, 5), _classes(g, 5, 4), None),
        "ce",
        lambda o: 5,
    ),
    Config(
        "ce_ignore",
        _ce(ignore_index=-1),
        lambda g: (_randn(g, 5, 5), _classes(g, 5, 5, ignore=-1), None),
        "ce",
        lambda o: 5,
    ),
    Config(
        "ce_weight_ignore",
        _ce(weight=W5, ignore_index=2),
        lambda g: (_randn(g, 5, 5), _classes(g, 5, 5, ignore=2), None),
        "ce",
        lambda o: 5,
    ),
    Config(
        "ce_smooth",
        _ce(label_smoothing=0.2),
        lambda g: (_randn(g, 4, 5), _classes(g, 5, 4), None),
        "ce",
        lambda o: 5,
    ),
    Config(
        "ce_smooth_weight_ignore",
        _ce(weight=W5, label_smoothing=0.3, ignore_index=-100),
        lambda g: (_randn(g, 5, 5), _classes(g, 5, 5, ignore=-100), None),
        "ce",
        lambda o: 5,
    ),
    Config(
        "ce_prob_targets",
        _ce(weight=W5, label_smoothing=0.1),
        lambda g: (_randn(g, 4, 5), _randn(g, 4, 5).softmax(1), None),
        "ce",
        lambda o: 5,
    ),
    Config(
        "ce_spatial",
        _ce(weight=W4, ignore_index=-100),
        lambda g: (_randn(g, 3, 4, 2, 3), _classes(g, 4, 3, 2, 3, ignore=-100), None),
        "ce",
        lambda o: 4 * 6,
    ),
    Config(
        "ce_spatial_prob",
        _ce(),
        lambda g: (_randn(g, 2, 3, 4), _randn(g, 2, 3, 4).softmax(1), None),
        "ce",
        lambda o: 3 * 4,
    ),
    Config(
        "ce_flat_lm",
        _ce(label_smoothing=0.1, ignore_index=-100),
        lambda g: (_randn(g, 3 * 4, 5), _classes(g, 5, 3 * 4, ignore=-100), 3),
        "ce",
        lambda o: 5 * 4,
    ),
    Config(
        "mse",
        lambda r: nn.MSELoss(reduction=r),
        lambda g: (_randn(g, 4, 3), _randn(g, 4, 3), None),
        "mse",
        lambda o: 3,
    ),
    Config(
        "mse_seq",
        lambda r: nn.MSELoss(reduction=r),
        lambda g: (_randn(g, 3, 4, 2), _randn(g, 3, 4, 2), None),
        "mse",
        lambda o: 8,
    ),
    Config(
        "mse_flat",
        lambda r: nn.MSELoss(reduction=r),
        lambda g: (_randn(g, 6, 2), _randn(g, 6, 2), 2),
        "mse",
        lambda o: 6,
    ),
    Config(
        "bce_weight_pos_weight",
        lambda r: nn.BCEWithLogitsLoss(reduction=r, weight=_W3, pos_weight=_P3),
        lambda g: (2 * _randn(g, 4, 3), _rand(g, 4, 3), None),
        "bce",
        lambda o: 3,
    ),
    Config(
        "bce_seq_pos_weight",
        lambda r: nn.BCEWithLogitsLoss(reduction=r, pos_weight=_P3),
        lambda g: (_randn(g, 3, 2, 3), (_rand(g, 3, 2, 3) > 0.5).to(DT), None),
        "bce",
        lambda o: 6,
    ),
    Config(
        "huber",
        lambda r: nn.HuberLoss(reduction=r, delta=0.7),
        lambda g: (_randn(g, 4, 3), _randn(g, 4, 3), None),
        "generic",
        lambda o: 3,
    ),
    Config(
        "smooth_l1",
        lambda r: nn.SmoothL1Loss(reduction=r, beta=0.5),
        lambda g: (_randn(g, 4, 3), _randn(g, 4, 3), None),
        "generic",
        lambda o: 3,
    ),
    Config(
        "kldiv_log_target",
        lambda r: nn.KLDivLoss(reduction="batchmean" if r == "mean" else r, log_target=True),
        lambda g: (_randn(g, 4, 3).log_softmax(1), _randn(g, 4, 3).log_softmax(1), None),
        "generic",
        lambda o: 3,
    ),
    Config(
        "poisson_nll",
        lambda r: nn.PoissonNLLLoss(reduction=r),
        lambda g: (_randn(g, 4, 3), 3 * _rand(g, 4, 3), None),
        "generic",
        lambda o: 3,
    ),
    Config(
        "poisson_nll_linear",
        lambda r: nn.PoissonNLLLoss(reduction=r, log_input=False),
        lambda g: (_rand(g, 4, 3) + 0.5, 3 * _rand(g, 4, 3), None),
        "generic",
        lambda o: 3,
    ),
    Config(
        "custom_dense",
        lambda r: CoupledSoftplusLoss(r),
        lambda g: (_randn(g, 3, 4), _rand(g, 3, 4), None),
        "generic",
        lambda o: 4,
    ),
    Config(
        "custom_dense_flat",
        lambda r: CoupledSoftplusLoss(r),
        lambda g: (_randn(g, 6, 2), _rand(g, 6, 2), 3),
        "generic",
        lambda o: 4,
    ),
]
REDUCTIONS = ["mean", "sum"]
CASES = [pytest.param(c, r, id=f"{c.name}-{r}") for c in CONFIGS for r in REDUCTIONS]


def _setup(config: Config, reduction: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    output, target, batch_size = config.make_data(g)
    loss_fn = config.make_loss(reduction)
    n = batch_size or output.shape[0]
    return loss_fn, output, target, batch_size, n


def _full_hessian(loss_fn, output, target, n):
    """Hessian of L w.r.t. the whole output, as [N, Q, N, Q] (independent autograd)."""
    q = output.numel() // n
    h = torch.autograd.functional.hessian(lambda f: loss_fn(f, target), output)
    return h.reshape(n, q, n, q)


def _diag_blocks(h):
    return torch.stack([h[i, :, i, :] for i in range(h.shape[0])])


def _outer_per_sample(cols, n):
    """Σ_k vec(S_k[n]) vec(S_k[n])ᵀ, as [N, Q, Q]."""
    flat = cols.reshape(cols.shape[0], n, -1)
    return torch.einsum("kni,knj->nij", flat, flat)


# ----------------------------------------------------------------------------------------
# per-sample losses
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,reduction", CASES)
def test_individual_losses_reproduce_batch_loss(config, reduction):
    loss_fn, output, target, batch_size, n = _setup(config, reduction)
    losses = individual_losses(loss_fn, output, target, batch_size=batch_size)
    assert losses.shape == (n,)
    assert losses.dtype == DT
    batch_loss = loss_fn(output, target)
    rebuilt = losses.mean() if reduction == "mean" else losses.sum()
    assert torch.allclose(rebuilt, batch_loss, rtol=0, atol=1e-12)


def test_individual_losses_are_per_sample():
    """Sample n's loss depends only on sample n and matches the single-sample formula."""
    g = torch.Generator().manual_seed(1)
    output, target = _randn(g, 4, 5), _classes(g, 5, 4)
    loss_fn = nn.CrossEntropyLoss(weight=W5)
    losses = individual_losses(loss_fn, output, target)
    # l_n = N · w_y (−log p_y) / Σ w_y
    logp = output.log_softmax(1).gather(1, target[:, None])[:, 0]
    expected = 4 * W5[target] * (-logp) / W5[target].sum()
    assert torch.allclose(losses, expected, atol=1e-12)
    # flattened LM layout: sample n owns rows n·T .. n·T+T−1
    output, target = _randn(g, 6, 3), _classes(g, 3, 6)
    losses = individual_losses(nn.CrossEntropyLoss(reduction="sum"), output, target, 2)
    rows = nn.functional.cross_entropy(output, target, reduction="none")
    assert torch.allclose(losses, rows.reshape(2, 3).sum(1), atol=1e-12)


# ----------------------------------------------------------------------------------------
# exact square roots
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,reduction", CASES)
def test_exact_sqrt_matches_hessian_blocks(config, reduction):
    loss_fn, output, target, batch_size, n = _setup(config, reduction)
    cols = hessian_sqrt(loss_fn, output, target, batch_size=batch_size)
    assert cols.shape == (config.exact_columns(output), *output.shape)
    assert cols.dtype == output.dtype
    h = _full_hessian(loss_fn, output, target, n)
    # sanity of separability: no curvature between different samples
    off = h.clone()
    for i in range(n):
        off[i, :, i, :] = 0
    assert off.abs().max() <= 1e-12
    blocks = _diag_blocks(h)
    assert blocks.abs().max() > 0 or config.name.startswith("kldiv")
    assert torch.allclose(_outer_per_sample(cols, n), blocks, rtol=0, atol=1e-10)


@pytest.mark.parametrize("config,reduction", CASES)
def test_exact_sqrt_engine_style(config, reduction):
    """Σ_k Σ_n (J_n S_k[n])(J_n S_k[n])ᵀ = Σ_n J_n H_n J_nᵀ for random per-sample maps."""
    loss_fn, output, target, batch_size, n = _setup(config, reduction)
    cols = hessian_sqrt(loss_fn, output, target, batch_size=batch_size)
    q = output.numel() // n
    jac = torch.randn(n, 7, q, generator=torch.Generator().manual_seed(5), dtype=DT)
    backpropagated = torch.einsum("nrq,knq->knr", jac, cols.reshape(-1, n, q))
    ggn = torch.einsum("knr,kns->rs", backpropagated, backpropagated)
    blocks = _diag_blocks(_full_hessian(loss_fn, output, target, n))
    expected = torch.einsum("nrq,nqp,nsp->rs", jac, blocks, jac)
    assert torch.allclose(ggn, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "name", ["ce_spatial", "ce_flat_lm", "mse_seq", "mse_flat", "bce_seq_pos_weight"]
)
def test_exact_columns_touch_one_position_per_sample(name):
    config = next(c for c in CONFIGS if c.name == name)
    loss_fn, output, target, batch_size, n = _setup(config, "mean")
    cols = hessian_sqrt(loss_fn, output, target, batch_size=batch_size)
    if config.kind == "ce":  # positions: everything but the class dim, per sample
        per_pos = cols.movedim(2, -1).reshape(cols.shape[0], n, -1, output.shape[1])
        touched = per_pos.abs().amax(-1) > 0
    else:  # every element is its own position
        touched = cols.reshape(cols.shape[0], n, -1) != 0
    assert (touched.sum(-1) <= 1).all()
    assert touched.any()


def test_shared_weight_layer_ggn_over_positions():
    """Engine scenario: one weight applied at every position; diag GGN by column backprop."""
    g = torch.Generator().manual_seed(3)
    n, t, d_in, c = 3, 4, 2, 5
    act = _randn(g, n, t, d_in)
    weight = _randn(g, c, d_in)
    target = _classes(g, c, n * t, ignore=-100)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def model(w):
        return torch.einsum("ntd,cd->ntc", act, w).reshape(n * t, c)  # flattened LM layout

    output = model(weight)
    cols = hessian_sqrt(loss_fn, output, target, batch_size=n).reshape(-1, n, t, c)
    # engine: b[k, n, s, :] are the columns; G_k,n = Σ_s b ⊗ a; diag GGN = Σ_k Σ_n G²
    per_sample = torch.einsum("knsc,nsd->kncd", cols, act)
    diag_ggn = (per_sample**2).sum((0, 1))
    jac = torch.autograd.functional.jacobian(model, weight).reshape(n * t * c, c * d_in)
    h = torch.autograd.functional.hessian(lambda f: loss_fn(f, target), output)
    ggn = jac.T @ h.reshape(n * t * c, n * t * c) @ jac
    assert torch.allclose(diag_ggn, torch.diagonal(ggn).reshape(c, d_in), atol=1e-12)


# ----------------------------------------------------------------------------------------
# Monte-Carlo square roots
# ----------------------------------------------------------------------------------------

DRAWS = 3000


def _mc_within(mean, se, exact, factor=5.0):
    tol = factor * se + 1e-10 * (1 + exact.abs().max())
    return bool(((mean - exact).abs() <= tol).all())


@pytest.mark.parametrize("config,reduction", CASES)
def test_mc_sqrt_is_unbiased(config, reduction):
    loss_fn, output, target, batch_size, n = _setup(config, reduction)
    gen = torch.Generator().manual_seed(1234)
    cols = hessian_sqrt(
        loss_fn, output, target, mc_samples=DRAWS, generator=gen, batch_size=batch_size
    )
    assert cols.shape == (DRAWS, *output.shape)
    assert cols.dtype == output.dtype
    flat = cols.reshape(DRAWS, n, -1) * DRAWS**0.5  # single-draw columns (M = 1 scaling)
    draws = torch.einsum("kni,knj->knij", flat, flat)
    mean, se = draws.mean(0), draws.std(0) / DRAWS**0.5
    # the returned columns already average the draws
    assert torch.allclose(_outer_per_sample(cols, n), mean, atol=1e-12)
    exact = _diag_blocks(_full_hessian(loss_fn, output, target, n))
    assert _mc_within(mean, se, exact)
    if exact.abs().max() > 0:  # the check has power: a biased estimator fails it
        assert not _mc_within(2 * mean, se, exact)
        assert not _mc_within(0.8 * mean, se, exact)


def test_mc_is_reproducible_with_generator():
    config = next(c for c in CONFIGS if c.name == "ce_spatial")
    loss_fn, output, target, _, _ = _setup(config, "mean")

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return hessian_sqrt(loss_fn, output, target, mc_samples=2, generator=gen)

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_generic_path_leaves_global_rng_alone():
    state = torch.get_rng_state()
    loss_fn = CoupledSoftplusLoss()
    hessian_sqrt(loss_fn, torch.randn(2, 3, dtype=DT), torch.rand(2, 3, dtype=DT))
    torch.set_rng_state(state)
    expected = torch.rand(3)
    torch.set_rng_state(state)
    hessian_sqrt(loss_fn, torch.zeros(2, 3, dtype=DT), torch.zeros(2, 3, dtype=DT))
    assert torch.equal(torch.rand(3), expected)


def test_float32_output_keeps_dtype():
    output = torch.randn(4, 3)
    target = torch.randint(3, (4,))
    for mc in (None, 2):
        cols = hessian_sqrt(nn.CrossEntropyLoss(), output, target, mc_samples=mc)
        assert cols.dtype == torch.float32
    assert individual_losses(nn.CrossEntropyLoss(), output, target).dtype == torch.float32


# ----------------------------------------------------------------------------------------
# generic path: fallback, warnings and errors
# ----------------------------------------------------------------------------------------


def test_generic_fallback_for_torch_func_incompatible_loss():
    g = torch.Generator().manual_seed(4)
    output, target = _randn(g, 3, 2), _randn(g, 3, 2)
    loss_fn = QuarticFunctionLoss()
    with pytest.warns(RuntimeWarning, match="QuarticFunctionLoss: torch.func"):
        cols = hessian_sqrt(loss_fn, output, target)
    blocks = _diag_blocks(_full_hessian(loss_fn, output, target, 3))
    assert torch.allclose(_outer_per_sample(cols, 3), blocks, atol=1e-10)
    losses = individual_losses(loss_fn, output, target)
    assert torch.allclose(losses.mean(), loss_fn(output, target), atol=1e-12)


def test_indefinite_generic_loss_warns_and_drops_negative_part():
    output = torch.randn(3, 2, dtype=DT)
    with pytest.warns(RuntimeWarning, match="IndefiniteLoss.*not positive semi-definite"):
        cols = hessian_sqrt(IndefiniteLoss(), output, None)
    expected = torch.diag(torch.tensor([2.0, 0.0], dtype=DT)).expand(3, 2, 2)
    assert torch.allclose(_outer_per_sample(cols, 3), expected, atol=1e-12)


def test_non_separable_generic_loss_warns():
    def coupled(output, target):
        return (output.sum() - target.sum()) ** 2

    with pytest.warns(RuntimeWarning, match="couples different samples"):
        hessian_sqrt(coupled, torch.randn(3, 2, dtype=DT), torch.randn(3, 2, dtype=DT))


def test_separable_generic_loss_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian_sqrt(nn.PoissonNLLLoss(), torch.randn(3, 2, dtype=DT), torch.rand(3, 2, dtype=DT))


def test_plain_function_loss():
    output, target = torch.randn(3, 2, dtype=DT), torch.randn(3, 2, dtype=DT)
    assert classify(plain_sum_of_squares) == LossInfo("generic", None, repr(plain_sum_of_squares))
    cols = hessian_sqrt(plain_sum_of_squares, output, target)
    blocks = _diag_blocks(_full_hessian(plain_sum_of_squares, output, target, 3))
    assert torch.allclose(_outer_per_sample(cols, 3), blocks, atol=1e-10)
    with pytest.raises(ValueError, match="no 'reduction' attribute"):
        individual_losses(plain_sum_of_squares, output, target)


def test_unreduced_copy_must_reproduce_loss():
    output, target = torch.randn(3, 2, dtype=DT), torch.randn(3, 2, dtype=DT)
    with pytest.raises(ValueError, match="IgnoresReductionLoss.*does not reproduce"):
        individual_losses(IgnoresReductionLoss(), output, target)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(reduction="none"),
        nn.MSELoss(reduction="none"),
        nn.BCEWithLogitsLoss(reduction="none"),
        nn.HuberLoss(reduction="none"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_reduction_none_raises(loss_fn):
    name = type(loss_fn).__name__
    output = torch.randn(3, 2, dtype=DT)
    target = torch.randint(2, (3,)) if name == "CrossEntropyLoss" else torch.rand(3, 2, dtype=DT)
    with pytest.raises(ValueError, match=f"{name} has reduction='none'"):
        classify(loss_fn)
    with pytest.raises(ValueError, match=f"{name} has reduction='none'"):
        hessian_sqrt(loss_fn, output, target)
    with pytest.raises(ValueError, match=f"{name} has reduction='none'"):
        individual_losses(loss_fn, output, target)


def test_classify_kinds():
    assert classify(nn.CrossEntropyLoss()) == LossInfo("ce", "mean", "CrossEntropyLoss")
    assert classify(nn.MSELoss(reduction="sum")) == LossInfo("mse", "sum", "MSELoss")
    assert classify(nn.BCEWithLogitsLoss()).kind == "bce"
    assert classify(nn.KLDivLoss(reduction="batchmean")).reduction == "mean"
    assert classify(nn.HuberLoss()).kind == "generic"

    class MyCE(nn.CrossEntropyLoss):
        pass

    assert classify(MyCE()).kind == "generic"  # subclasses may override forward


def test_invalid_arguments_raise():
    output, target = torch.randn(6, 3, dtype=DT), torch.randint(3, (6,))
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="not divisible"):
        hessian_sqrt(ce, output, target, batch_size=4)
    with pytest.raises(ValueError, match="not divisible"):
        individual_losses(ce, output, target, batch_size=4)
    with pytest.raises(ValueError, match="mc_samples"):
        hessian_sqrt(ce, output, target, mc_samples=0)
    with pytest.raises(ValueError, match="target shape"):
        hessian_sqrt(ce, output, torch.randint(3, (5,)))
    with pytest.raises(ValueError, match="unbatched"):
        hessian_sqrt(ce, torch.randn(3, dtype=DT), torch.tensor(1))
    with pytest.raises(ValueError, match="broadcasts the output"):
        hessian_sqrt(nn.MSELoss(), torch.randn(3, 1, dtype=DT), torch.randn(3, 4, dtype=DT))


def test_negative_bce_weight_warns():
    loss_fn = nn.BCEWithLogitsLoss(weight=torch.tensor([1.0, -1.0], dtype=DT))
    with pytest.warns(RuntimeWarning, match="BCEWithLogitsLoss: negative"):
        cols = hessian_sqrt(loss_fn, torch.randn(3, 2, dtype=DT), torch.rand(3, 2, dtype=DT))
    assert (cols.reshape(-1, 3, 2)[:, :, 1] == 0).all()
