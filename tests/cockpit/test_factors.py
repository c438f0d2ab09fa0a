"""Histogram kernels of :mod:`cockpit.factors` against explicit float64 binning."""

from __future__ import annotations

import math

import pytest
import torch

import cockpit.factors as factors
from cockpit import native
from cockpit.factors import AffineFactor, bin_edges_of, bin_index, uniform_counts
from cockpit.quantities import Hist1D, Hist2D


@pytest.fixture(params=["native", "torch"])
def counting(request, monkeypatch):
    """Each histogram test runs on the compiled kernels and on the torch path."""
    if request.param == "native":
        assert native.library() is not None, "the compiled histogram kernels were not built"
    monkeypatch.setattr(factors, "NATIVE", request.param == "native")
    return request.param


@pytest.fixture
def torch_counting(monkeypatch):
    """The torch path only (its index arrays, pieces and scratch are what a test checks)."""
    monkeypatch.setattr(factors, "NATIVE", False)


def reference_counts(values: torch.Tensor, low: float, high: float, bins: int) -> torch.Tensor:
    """Explicit float64 binning against the edges; NaN dropped, outliers clamped."""
    v = values.reshape(-1).double()
    v = v[~v.isnan()].clamp(low, high)
    edges = bin_edges_of(low, high, bins)
    idx = (torch.searchsorted(edges, v, right=True) - 1).clamp(0, bins - 1)
    return torch.bincount(idx, minlength=bins).double()


def test_edges_match_linspace():
    for low, high, bins in [(-2.0, 2.0, 100), (-1.3, 0.9, 37), (0.5, 3.0, 7), (-1.0, 1.0, 40)]:
        torch.testing.assert_close(
            bin_edges_of(low, high, bins),
            torch.linspace(low, high, bins + 1, dtype=torch.float64),
            rtol=0,
            atol=1e-12,
        )


def test_tiny_values_keep_their_sign_at_the_zero_edge(counting):
    # (x − low)·k would round −1e−9 onto the edge at 0 (one bin too high).
    x = torch.tensor([-1e-9, -1e-30, 0.0, 1e-30, 1e-9], dtype=torch.float32)
    assert bin_index(x, -2.0, 2.0, 100).tolist() == [49, 49, 50, 50, 50]
    assert uniform_counts(x, -2.0, 2.0, 100)[49:51].tolist() == [2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low,high,bins", [(-2.0, 2.0, 100), (-1.3, 0.9, 37), (0.1, 0.4, 300)])
def test_uniform_counts(dtype, low, high, bins, counting):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(5000) * 0.01, torch.randn(5000) * 3]).to(dtype)
    x[::97] = 0.0
    torch.testing.assert_close(
        uniform_counts(x, low, high, bins), reference_counts(x, low, high, bins), rtol=0, atol=0
    )


def test_nan_is_not_counted_and_inf_is_clamped(counting):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.25, float("nan")])
    counts = uniform_counts(x, -1.0, 1.0, 4)
    assert counts.tolist() == [1.0, 0.0, 1.0, 1.0]
    q = Hist2D(bins=(2, 3), range=((-1.0, 1.0), (-1.0, 1.0)))
    g = torch.tensor([[float("nan"), 0.5, -0.5]])
    h = factors._hist2d(g, torch.tensor([0.0, 0.9, -0.9]), q)
    assert h.sum() == 2 and h[1, 2] == 1 and h[0, 0] == 1


@pytest.mark.parametrize("scale", [0.0, 1e-4, 0.03, 1.0, 30.0])
@pytest.mark.parametrize(
    "low,high,bins", [(-2.0, 2.0, 100), (-1.3, 0.9, 37), (0.01, 0.2, 5), (-1.0, 1.0, 1)]
)
@pytest.mark.parametrize("count", ["_outer_hist1d_sparse", "_outer_hist1d_all_edges"])
def test_outer_histogram_equals_materialized(scale, low, high, bins, count):
    """Sorted-input counting of outer products b aᵀ equals binning every entry.

    Both forms: searching the edges inside each row's range (CPU) and all edges (GPU).
    """
    torch.manual_seed(1)
    a = torch.relu(torch.randn(16, 70))  # ReLU inputs: many exact zeros
    a[:, :4] = torch.randn(16, 4)  # and some negative ones
    a[3] = 0.0  # a sample with an all-zero input
    b = torch.randn(16, 9) * scale
    b[0, :3] = 0.0
    b[5] = -b[5].abs()
    q = Hist1D(bins=bins, range=(low, high))
    entries = b[:, :, None].double() * a[:, None, :].double()
    expected = reference_counts(entries, low, high, bins)
    got = getattr(factors, count)(a, b, q)
    assert got.sum() == a.shape[0] * a.shape[1] * b.shape[1]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_affine_factor_uses_outer_path_and_falls_back_on_nonfinite(monkeypatch):
    torch.manual_seed(2)
    a = torch.randn(8, 1, 1, 30, dtype=torch.float64)
    b = torch.randn(8, 1, 1, 6, dtype=torch.float64) * 0.3
    q = Hist1D(bins=20, range=(-1.0, 1.0))
    factor = AffineFactor(a, b, (6, 30))
    calls = []
    real = factors._outer_hist1d
    monkeypatch.setattr(factors, "_outer_hist1d", lambda *args: calls.append(1) or real(*args))
    fast = factor.reduce([q], torch.zeros(6, 30), {})[q]
    assert calls, "S = 1 affine factors count outer products without building them"
    expected = reference_counts(factor.to_dense(), -1.0, 1.0, 20)
    torch.testing.assert_close(fast, expected, rtol=0, atol=0)
    monkeypatch.setattr(factors, "OUTER_HIST", False)
    torch.testing.assert_close(factor.reduce([q], torch.zeros(6, 30), {})[q], expected)

    calls.clear()
    monkeypatch.setattr(factors, "OUTER_HIST", True)
    a_bad = a.clone()
    a_bad[0, 0, 0, 0] = math.inf
    bad = AffineFactor(a_bad, b, (6, 30)).reduce([q], torch.zeros(6, 30), {})[q]
    assert not calls, "non-finite factors take the materialized path"
    dense = AffineFactor(a_bad, b, (6, 30)).to_dense()
    torch.testing.assert_close(bad, reference_counts(dense, -1.0, 1.0, 20))


def test_owned_temporaries_are_binned_in_place_but_never_handed_out_ones(torch_counting):
    from cockpit.factors import DenseFactor
    from cockpit.quantities import IndividualGradients

    torch.manual_seed(3)
    g = torch.randn(4, 5, dtype=torch.float64)
    q = Hist1D(bins=8, range=(-1.0, 1.0))
    expected = reference_counts(g, -1.0, 1.0, 8)
    kept = g.clone()
    out = DenseFactor(kept, owned=True).reduce([q, IndividualGradients()], kept, {})
    torch.testing.assert_close(out[IndividualGradients()], g, rtol=0, atol=0)
    torch.testing.assert_close(out[q], expected, rtol=0, atol=0)
    scratch = g.clone()
    out = DenseFactor(scratch, owned=True).reduce([q], scratch, {})
    torch.testing.assert_close(out[q], expected, rtol=0, atol=0)
    assert not torch.equal(scratch, g), "an owned temporary is reused as scratch"
    unowned = g.clone()
    DenseFactor(unowned).reduce([q], unowned, {})
    torch.testing.assert_close(unowned, g, rtol=0, atol=0)


def _chunk_case(kind: str):
    """A factor, its parameter and a direction, for the chunked-materialization test."""
    from cockpit.layers.conv import ConvFactor

    torch.manual_seed(7)
    if kind == "affine_seq":  # Linear on sequences: a [N, 1, S, I], b [N, 1, S, O]
        a = torch.randn(5, 1, 3, 8, dtype=torch.float64)
        b = torch.randn(5, 1, 3, 6, dtype=torch.float64)
        return AffineFactor(a, b, (6, 8))
    if kind == "affine_s1":  # S = 1: only the histograms of pairs need the entries
        a = torch.randn(5, 1, 1, 8, dtype=torch.float64)
        b = torch.randn(5, 1, 1, 6, dtype=torch.float64)
        return AffineFactor(a, b, (6, 8))
    # (C_in, C_out, groups, spatial): unfolded patches vs the grouped weight-gradient kernel
    c_in, c_out, groups, hw = {
        "conv_unfold": (4, 6, 1, 5),
        "conv_grouped": (16, 4, 1, 10),
        "conv_groups2": (4, 6, 2, 5),
    }[kind]
    layer = torch.nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups).double()
    x = torch.randn(3, c_in, hw, hw, dtype=torch.float64)
    g = torch.randn(3, c_out, hw, hw, dtype=torch.float64)
    return ConvFactor(x, g, layer, layer.padding)


@pytest.mark.parametrize("pairs", [True, False], ids=["with_gram", "without_gram"])
@pytest.mark.parametrize(
    "kind", ["affine_seq", "affine_s1", "conv_unfold", "conv_grouped", "conv_groups2"]
)
def test_chunked_materialization_equals_the_explicit_quantities(kind, pairs, monkeypatch):
    """Per-sample gradients built in chunks of parameter rows when samples are paired
    (Gram matrix, ⟨g_n, ḡ⟩), of samples otherwise and for grouped convolutions (which
    then cannot pair samples), reduce to the same quantities as the explicit ``[N, D]``
    matrix."""
    from cockpit.quantities import (
        BatchDot,
        BatchL2,
        GradDot,
        IndividualGradients,
        Projection,
        SecondMoment,
    )

    factor = _chunk_case(kind)
    dense = factor.to_dense()  # [N, *P]
    n, shape = dense.shape[0], dense.shape[1:]
    flat = dense.reshape(n, -1)
    param = torch.randn(shape, dtype=torch.float64)
    u = torch.randn(shape, dtype=torch.float64)
    h1 = Hist1D(bins=13, range=(-3.0, 3.0))
    h2 = Hist2D(bins=(7, 5), range=((-3.0, 3.0), (-1.5, 1.5)))
    gram = flat @ flat.T
    expected = {
        BatchL2(): (flat**2).sum(1),
        BatchDot(): gram,
        GradDot(): gram.mean(1),
        SecondMoment(): (dense**2).sum(0),
        Projection("u"): flat @ u.reshape(-1),
        IndividualGradients(): dense,
        h1: reference_counts(dense, -3.0, 3.0, 13),
    }
    gi = bin_index(flat, -3.0, 3.0, 7)
    pi = bin_index(param.reshape(1, -1).expand_as(flat), -1.5, 1.5, 5)
    expected[h2] = torch.bincount((gi * 5 + pi).reshape(-1), minlength=35).double().view(7, 5)
    small = 40  # elements per chunk: one parameter row (or one sample) at a time
    assert n * shape.numel() > small
    monkeypatch.setattr(factors, "CHUNK_ELEMENTS", small)
    monkeypatch.setattr(factors, "ROW_CHUNK_ELEMENTS", small)
    calls = []
    rows, samples = factor.to_dense_rows, factor.to_dense
    monkeypatch.setattr(factor, "to_dense_rows", lambda *a: calls.append("rows") or rows(*a))
    monkeypatch.setattr(factor, "to_dense", lambda *a: calls.append("samples") or samples(*a))
    requests = list(expected)
    if kind == "conv_groups2" or not pairs:  # grouped convolutions chunk samples only,
        for q in (BatchDot(), GradDot()):  # so the pairing quantities are left out there
            requests.remove(q)
            del expected[q]
    got = factor._materialized(requests, param, {"u": u})
    chunks = "rows" if pairs and kind != "conv_groups2" else "samples"
    assert len(calls) > 2 and set(calls) == {chunks}
    for q in requests:
        tol = 0 if isinstance(q, (Hist1D, Hist2D)) else 1e-12
        torch.testing.assert_close(got[q], expected[q], rtol=tol, atol=tol, msg=f"{q}")


@pytest.mark.parametrize("kind", ["affine_seq", "conv_unfold", "conv_grouped"])
def test_pairing_quantities_are_bounded_by_the_row_chunk_size(kind, monkeypatch):
    """The Gram matrix builds per-sample gradients under ROW_CHUNK_ELEMENTS on the CPU
    (in one piece when the layer fits), other quantities under CHUNK_ELEMENTS."""
    from cockpit.quantities import BatchDot, BatchL2, SecondMoment

    factor = _chunk_case(kind)
    dense = factor.to_dense()
    n, numel = dense.shape[0], dense[0].numel()
    calls = []
    rows, samples = factor.to_dense_rows, factor.to_dense
    monkeypatch.setattr(factor, "to_dense_rows", lambda *a: calls.append("rows") or rows(*a))
    monkeypatch.setattr(factor, "to_dense", lambda *a: calls.append("samples") or samples(*a))
    monkeypatch.setattr(factors, "CHUNK_ELEMENTS", numel)  # one sample a chunk
    monkeypatch.setattr(factors, "ROW_CHUNK_ELEMENTS", n * numel)  # the whole layer
    gram = factor._materialized([BatchDot(), BatchL2()], torch.zeros(dense.shape[1:]), {})
    assert calls == ["samples"]  # one piece: no row chunks
    torch.testing.assert_close(gram[BatchDot()], dense.reshape(n, -1) @ dense.reshape(n, -1).T)
    calls.clear()
    factor._materialized([SecondMoment()], torch.zeros(dense.shape[1:]), {})
    assert calls == ["samples"] * n  # sample chunks under CHUNK_ELEMENTS
    calls.clear()
    monkeypatch.setattr(factors, "ROW_CHUNK_ELEMENTS", n * numel - 1)
    factor._materialized([BatchDot()], torch.zeros(dense.shape[1:]), {})
    assert calls and set(calls) == {"rows"}


@pytest.mark.parametrize("kind", ["affine_seq", "conv_unfold", "conv_grouped", "conv_groups2"])
def test_grad_dot_with_the_mean_gradient_given_chunks_samples(kind, monkeypatch):
    """With ḡ passed under MEAN_GRADIENT, ⟨g_n, ḡ⟩ is a projection: the per-sample
    gradients are built in chunks of samples (not of parameter rows), of equal size,
    and ⟨g_n, ḡ⟩ equals the explicit one."""
    from cockpit.factors import MEAN_GRADIENT
    from cockpit.quantities import BatchL2, GradDot, SecondMoment

    factor = _chunk_case(kind)
    dense = factor.to_dense()
    n, shape = dense.shape[0], dense.shape[1:]
    flat = dense.reshape(n, -1)
    mean = dense.mean(0)
    expected = {
        GradDot(): flat @ mean.reshape(-1),
        BatchL2(): (flat**2).sum(1),
        SecondMoment(): (flat**2).sum(0).view(shape),
    }
    limit = n - 1  # samples a chunk: N = 5 → 3 + 2 (not 4 + 1), N = 3 → 2 + 1
    monkeypatch.setattr(factors, "CHUNK_ELEMENTS", limit * shape.numel())
    sizes = []
    rows, samples = factor.to_dense_rows, factor.to_dense
    monkeypatch.setattr(factor, "to_dense_rows", lambda *a: sizes.append("rows") or rows(*a))
    monkeypatch.setattr(
        factor, "to_dense", lambda lo=0, hi=None: sizes.append(min(hi, n) - lo) or samples(lo, hi)
    )
    got = factor._materialized(list(expected), torch.zeros(shape), {MEAN_GRADIENT: mean})
    assert sizes == [(n + 1) // 2, n // 2]
    for q, ref in expected.items():
        torch.testing.assert_close(got[q], ref, rtol=1e-12, atol=1e-12, msg=f"{q}")
    wrong = factor._materialized([GradDot()], torch.zeros(shape), {MEAN_GRADIENT: 2 * mean})
    assert not torch.allclose(wrong[GradDot()], expected[GradDot()])  # ḡ is what is used


@pytest.mark.parametrize(
    "kind", ["affine_seq", "affine_s1", "conv_unfold", "conv_grouped", "conv_groups2"]
)
def test_second_moment_squares_owned_chunks_last(kind, monkeypatch):
    """Without a 1D histogram the second moment squares each owned chunk in place, so
    it must come after every other quantity read off the same chunk."""
    from cockpit.quantities import BatchL2, Projection, SecondMoment

    factor = _chunk_case(kind)
    dense = factor.to_dense()
    n, shape = dense.shape[0], dense.shape[1:]
    flat = dense.reshape(n, -1)
    param = torch.randn(shape, dtype=torch.float64)
    u = torch.randn(shape, dtype=torch.float64)
    h2 = Hist2D(bins=(7, 5), range=((-3.0, 3.0), (-1.5, 1.5)))
    gi = bin_index(flat, -3.0, 3.0, 7)
    pi = bin_index(param.reshape(1, -1).expand_as(flat), -1.5, 1.5, 5)
    expected = {
        SecondMoment(): (flat**2).sum(0).view(shape),  # asked for first
        BatchL2(): (flat**2).sum(1),
        Projection("u"): flat @ u.reshape(-1),
        h2: torch.bincount((gi * 5 + pi).reshape(-1), minlength=35).double().view(7, 5),
    }
    monkeypatch.setattr(factors, "CHUNK_ELEMENTS", 40)
    if kind == "affine_s1":  # its own reduce would not build the entries
        got = factors.DenseFactor(factor.to_dense(), owned=True).reduce(
            list(expected), param, {"u": u}
        )
    else:
        got = factor._materialized(list(expected), param, {"u": u})
    for q, ref in expected.items():
        tol = 0 if isinstance(q, Hist2D) else 1e-12
        torch.testing.assert_close(got[q], ref, rtol=tol, atol=tol, msg=f"{q}")


@pytest.mark.parametrize("form", ["_squares_by_column", "_squares_stacked"])
@pytest.mark.parametrize("shared", ["a", "b", "neither"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_column_squares_equal_the_explicit_sum(form, shared, weighted, monkeypatch):
    """Σ_k Σ_n w[k, n] G[k, n]² for K columns with S > 1, built in chunks either way
    (column by column on the CPU, stacked elsewhere), equals the explicit sum."""
    from cockpit.factors import ColumnAffineFactor

    torch.manual_seed(11)
    k, n, g, s, i, o = 3, 5, 2, 4, 6, 3  # two groups, S = 4 positions
    a = torch.randn(1 if shared == "a" else k, n, g, s, i, dtype=torch.float64)
    b = torch.randn(1 if shared == "b" else k, n, g, s, o, dtype=torch.float64)
    w = torch.randn(k, n, dtype=torch.float64) if weighted else None
    grads = torch.einsum(
        "kngso,kngsi->kngoi", b.expand(k, -1, -1, -1, -1), a.expand(k, -1, -1, -1, -1)
    )
    weights = torch.ones(k, n, dtype=torch.float64) if w is None else w
    expected = (weights[:, :, None, None, None] * grads**2).sum((0, 1)).reshape(g * o, i)
    monkeypatch.setattr(factors, "CHUNK_ELEMENTS", 2 * g * o * i)  # two samples a chunk
    factor = ColumnAffineFactor(a, b, (g * o, i))
    got = getattr(factor, form)(w)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_long_index_arrays_are_counted_in_parallel_pieces(torch_counting, monkeypatch):
    torch.manual_seed(4)
    x = torch.cat([torch.randn(30_000) * 0.02, torch.randn(3_001) * 4])  # crowded bins
    expected = reference_counts(x, -2.0, 2.0, 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        monkeypatch.setattr(factors, "PARALLEL_COUNT_MIN", 1000)
        pieces = []
        real = torch.Tensor.tensor_split
        monkeypatch.setattr(
            torch.Tensor, "tensor_split", lambda t, k: pieces.append(k) or real(t, k)
        )
        got = uniform_counts(x, -2.0, 2.0, 100)
    finally:
        torch.set_num_threads(threads)
    assert pieces and pieces[0] >= 2
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [1, 2, 101, 128])
@pytest.mark.parametrize("start,stop", [(0, 6000), (0, 5999), (1, 6000), (1, 5999)])
def test_pair_counting_equals_bincount(size, start, stop):
    """Adjacent uint8 indices counted as one int16 pair, for odd lengths and offsets."""
    torch.manual_seed(size)
    idx = torch.randint(0, size, (6000,), dtype=torch.uint8)
    idx[1000:3000] = size // 2  # crowded, as gradient entries are around zero
    idx[-1] = size - 1  # the last entry is the odd one out for stop = 5999
    piece = idx[start:stop]
    torch.testing.assert_close(
        factors._count_pairs(piece, size),
        torch.bincount(piece, minlength=size),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    "low,high,bins",
    [
        (-2.0, 2.0, 100),  # the default: int8 indices, counted in pairs
        (-2.0, 2.0, 127),  # the widest int8 window
        (0.5, 3.0, 7),  # the offset ioff is negative
        (-300.0, -100.0, 100),  # ioff far beyond the int8 window: float offset
        (-2.0, 2.0, 128),  # more bins than int8 holds
        (-2.0, 2.0, 300),  # int16 indices
    ],
)
def test_long_histograms_equal_explicit_binning(low, high, bins, counting, monkeypatch):
    """Histograms of arrays long enough for pair counting, with NaN and outliers."""
    torch.manual_seed(bins)
    mid, width = (low + high) / 2, high - low
    x = torch.cat(
        [
            mid + torch.randn(50_000) * width / 300,  # crowded around the middle
            mid + torch.randn(20_001) * width,  # outliers on both sides
            torch.tensor([float("nan"), float("inf"), -float("inf"), low, high]),
        ]
    )
    x = x[torch.randperm(x.numel())]
    calls = []
    pairs = factors._count_pairs
    monkeypatch.setattr(factors, "_count_pairs", lambda *a: calls.append(1) or pairs(*a))
    got = uniform_counts(x.clone(), low, high, bins, inplace=True)
    torch.testing.assert_close(got, reference_counts(x, low, high, bins), rtol=0, atol=0)
    assert bool(calls) == (counting == "torch" and bins < 128)


@pytest.mark.parametrize("size", [1, 7, 101, 256])
def test_sorted_counting_equals_bincount(size):
    """The GPU's counting of uint8 indices (sort and search, no atomics), run on the CPU."""
    torch.manual_seed(size)
    idx = torch.randint(0, size, (5000,), dtype=torch.uint8)
    idx[:2000] = size // 2  # crowded, as gradient entries are around zero
    torch.testing.assert_close(
        factors._count_sorted(idx, size), torch.bincount(idx, minlength=size), rtol=0, atol=0
    )


def test_one_conv_column_squares_in_sample_chunks_with_weights(monkeypatch):
    """A convolution's curvature column, squared chunk by chunk with signed weights."""
    from cockpit.layers.conv import ColumnConvFactor

    factor = _chunk_case("conv_grouped")  # N = 3, grouped weight-gradient kernel
    dense = factor.to_dense()  # [N, *P]
    w = torch.tensor([[0.5, -2.0, 1.5]], dtype=torch.float64)  # [K = 1, N]
    expected = (w[0].view(-1, 1, 1, 1, 1) * dense**2).sum(0)
    monkeypatch.setattr(factors, "CHUNK_ELEMENTS", dense[0].numel())  # one sample a chunk
    calls = []
    real = factor.to_dense
    monkeypatch.setattr(factor, "to_dense", lambda *a: calls.append(a) or real(*a))
    column = ColumnConvFactor(factor)
    torch.testing.assert_close(column.sum_of_squares(w), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(column.sum_of_squares(), (dense**2).sum(0), rtol=1e-12, atol=1e-12)
    assert calls == [(0, 1), (1, 2), (2, 3)] * 2


def test_rows_of_a_grouped_factor_are_refused():
    factor = _chunk_case("conv_groups2")
    with pytest.raises(ValueError, match="2 groups"):
        factor.to_dense_rows(0, 2)
