"""Each supported layer type, alone, against explicit float64 per-sample gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import cockpit.layers.conv as conv_rules
from cockpit.engine import Engine
from cockpit.layers import find_rule
from cockpit.layers.conv import unfold
from tests.cockpit.test_engine import check_model

pytestmark = pytest.mark.usefixtures("float64")


class Head(nn.Module):
    """Wrap a layer so its (first) output is flattened per sample for an MSE loss."""

    def __init__(self, layer: nn.Module, **call_kwargs) -> None:
        super().__init__()
        self.layer = layer
        self.call_kwargs = call_kwargs

    def forward(self, x):
        out = self.layer(x, **self.call_kwargs)
        if isinstance(out, tuple):
            out = out[0]
        return torch.sin(out).flatten(1)  # a nonlinearity so outputs mix


def run(layer, x, **kw):
    model = Head(layer, **kw)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    for reduction in ("mean", "sum"):
        with warnings.catch_warnings():  # every module must have an exact rule: no fallback
            warnings.filterwarnings("error", message="no layer rule")
            check_model(model, nn.MSELoss(reduction=reduction), x, target)


@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 4), (3, 2, 3, 4), (1, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias):
    run(nn.Linear(4, 3, bias=bias), torch.randn(*shape))


CONV_CASES = [
    dict(),
    dict(stride=2),
    dict(padding=1),
    dict(padding="same"),
    dict(padding="same", dilation=2),
    dict(padding="valid", dilation=2, stride=2),
    dict(groups=2),
    dict(bias=False, padding=2, padding_mode="reflect"),
    dict(padding=1, padding_mode="circular", stride=2),
]


@pytest.mark.parametrize("path", ["grouped", "unfold"])
@pytest.mark.parametrize("kw", CONV_CASES, ids=str)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv(dim, kw, path, monkeypatch):
    # individual gradients from one grouped weight-gradient conv, or unfolded patches
    threshold = 1 if path == "grouped" else 10**9
    monkeypatch.setattr(conv_rules, "GROUPED_MIN_POSITIONS", threshold)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    size = {1: (9,), 2: (7, 6), 3: (5, 6, 4)}[dim]
    kernel = {1: 3, 2: (3, 2), 3: (2, 3, 2)}[dim]
    if kw.get("padding") == "same" and kernel != 3:
        kernel = {2: (4, 3), 3: (2, 3, 3)}[dim]  # even kernels pad asymmetrically
    run(cls(4, 6, kernel, **kw), torch.randn(3, 4, *size))


def test_conv_grouped_kernel_only_on_the_cpu(monkeypatch):
    # cuDNN's grouped per-sample kernel was measured slower than unfolding (benchmarks/
    # knob_probe.py); another device ("meta" here) must take the unfolded path
    from cockpit.factors import CHUNK_ELEMENTS, DEVICE_CHUNK_ELEMENTS, chunk_elements
    from cockpit.layers.conv import ConvFactor

    monkeypatch.setattr(conv_rules, "GROUPED_MIN_POSITIONS", 64)
    layer = nn.Conv2d(4, 6, 3, padding=1)
    factors = {
        dev: ConvFactor(
            torch.empty(2, 4, 9, 9, device=dev), torch.empty(2, 6, 9, 9, device=dev), layer, (1, 1)
        )
        for dev in ("cpu", "meta")
    }
    assert factors["cpu"].s >= conv_rules.GROUPED_MIN_POSITIONS
    assert factors["cpu"]._grouped_kernel()
    assert not factors["meta"]._grouped_kernel()
    assert chunk_elements(torch.device("meta")) == DEVICE_CHUNK_ELEMENTS > CHUNK_ELEMENTS


CONVT_CASES = [
    dict(),
    dict(stride=2),
    dict(stride=2, padding=1, output_padding=1),
    dict(dilation=2, padding=1),
    dict(groups=2, stride=2, bias=False),
]


@pytest.mark.parametrize("kw", CONVT_CASES, ids=str)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_transpose(dim, kw):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    size = {1: (5,), 2: (4, 3), 3: (3, 2, 3)}[dim]
    run(cls(4, 6, 3, **kw), torch.randn(2, 4, *size))


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding(padding_idx):
    layer = nn.Embedding(7, 3, padding_idx=padding_idx)
    run(layer, torch.tensor([[1, 2, 2, 5], [2, 2, 0, 6], [3, 3, 3, 3]]))


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(affine):
    if affine:
        run(nn.LayerNorm((3, 4)), torch.randn(4, 2, 3, 4))
        run(nn.LayerNorm(4, bias=False), torch.randn(4, 5, 4))


def test_group_norm():
    run(nn.GroupNorm(2, 4), torch.randn(3, 4, 5, 2))
    run(nn.GroupNorm(4, 4), torch.randn(3, 4, 5))


def test_rms_norm():
    run(nn.RMSNorm(4), torch.randn(3, 5, 4))
    run(nn.RMSNorm((2, 4), eps=1e-3), torch.randn(3, 2, 4))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_batch_norm_eval(dim):
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    layer = cls(4)
    x = torch.randn(5, 4, *([3] * dim))
    with torch.no_grad():
        layer(x * 2 + 1)
    run(layer.eval(), x)
    if dim == 1:  # BatchNorm1d on [N, C] too
        run(layer.eval(), torch.randn(5, 4))


@pytest.mark.parametrize(
    "kw",
    [
        dict(batch_first=True),
        dict(batch_first=False),
        dict(batch_first=True, bias=False, add_bias_kv=True),
        dict(batch_first=True, kdim=3, vdim=5),
    ],
    ids=str,
)
def test_multihead_attention(kw):
    kdim, vdim = kw.get("kdim", 4), kw.get("vdim", 4)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, **kw)
            self.k = nn.Linear(4, kdim)
            self.v = nn.Linear(4, vdim)

        def forward(self, x):
            q, k, v = x, self.k(x), self.v(x)  # layers see batch-first inputs
            if not kw["batch_first"]:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            out, _ = self.mha(q, k, v, need_weights=False)
            return out if kw["batch_first"] else out.transpose(0, 1)

    run(Attn(), torch.randn(3, 5, 4))
    assert find_rule(nn.MultiheadAttention(4, 2)).recurse


def test_multihead_attention_masks_and_weights_used():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            n, t, _ = x.shape
            kpm = x[:, :, 0] > 0.3  # a per-sample padding mask (never the first key)
            kpm[:, 0] = False
            causal = nn.Transformer.generate_square_subsequent_mask(t)
            out, weights = self.mha(x, x, x, key_padding_mask=kpm, attn_mask=causal)
            return torch.cat([out.flatten(1), weights.flatten(1)], 1)

    model = Attn()
    x = torch.randn(3, 4, 4)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    check_model(model, nn.MSELoss(), x, y)


def test_mha_3d_mask():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            n, t, _ = x.shape
            keys = (x[:, :, 0] > 0.3).double()  # per-sample key mask, head 1 unmasked
            keys[:, 0] = 0
            heads = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
            mask = (-1e9 * keys[:, None, None, :] * heads).expand(n, 2, t, t).reshape(n * 2, t, t)
            return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0].flatten(1)

    model = Attn()
    x = torch.randn(3, 4, 4)
    check_model(model, nn.MSELoss(), x, torch.randn(3, 16))


def test_mha_dropout_in_train_mode_raises():
    from cockpit.layers import UnsupportedModuleError
    from cockpit.quantities import BatchL2

    mha = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True)
    x = torch.randn(2, 3, 4)
    with Engine(mha, nn.MSELoss()) as engine:
        loss = mha(x, x, x)[0].pow(2).mean()
        with pytest.raises(UnsupportedModuleError, match="MultiheadAttention"):
            with engine.gather([BatchL2()]):
                loss.backward()


def test_unfold_matches_torch_unfold():
    x = torch.randn(2, 3, 7, 6)
    for k, s, p, d in [((3, 2), (1, 2), (1, 0), (1, 2)), ((2, 2), (2, 2), (0, 1), (2, 1))]:
        ours = unfold(x, k, s, p, d)
        ref = torch.nn.functional.unfold(x, k, dilation=d, padding=p, stride=s).transpose(1, 2)
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(groups=2)], ids=str)
@pytest.mark.parametrize("channels", [4, 32], ids=["gram-cheaper", "dense-cheaper"])
def test_conv_factored_forms_alone_and_read_off_built_gradients(kw, channels, monkeypatch):
    """Norms/projections use the factored forms alone and the built gradients otherwise."""
    from cockpit.quantities import BatchL2, Hist1D, Projection
    from tests.cockpit.test_engine import TOL, gather
    from tests.reference import per_sample_grads_func, quantity_from_grads

    layer = nn.Conv2d(channels, 6, 3, bias=False, **kw)
    model = Head(layer)
    x = torch.randn(3, channels, 5, 6)
    loss_fn = nn.MSELoss()
    with torch.no_grad():
        y = torch.randn_like(model(x))
    u = {"layer.weight": torch.randn_like(layer.weight)}
    ref = per_sample_grads_func(model, loss_fn, x, y)["layer.weight"]
    built = []
    original = conv_rules.ConvFactor.to_dense

    def counting(self, *a, **k):
        built.append(True)
        return original(self, *a, **k)

    projected = []  # the factored projection is one torch.convolution of x with u
    convolution = torch.convolution

    def counting_conv(*a, **k):
        projected.append(True)
        return convolution(*a, **k)

    monkeypatch.setattr(conv_rules.ConvFactor, "to_dense", counting)
    monkeypatch.setattr(torch, "convolution", counting_conv)
    hist = Hist1D(bins=11, range=(-0.5, 0.5))
    for qs, builds in (
        ([Projection("u")], False),
        ([BatchL2(), Projection("u")], None),  # the Gram form only where it is cheaper
        ([BatchL2(), Projection("u"), hist], True),
    ):
        built.clear()
        projected.clear()
        result = gather(model, loss_fn, x, y, qs, {"u": u})
        for q in qs:
            expected = quantity_from_grads(q, ref, layer.weight.detach(), u["layer.weight"])
            torch.testing.assert_close(result[q]["layer.weight"], expected, **TOL, msg=str(q))
        if builds is not None:
            assert bool(built) == builds, (qs, built)
        assert bool(projected) != bool(built), "one way to the projection, never both"
