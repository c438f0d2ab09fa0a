"""Histogram kernels of :mod:`cockpit.factors` against explicit float64 binning."""

from __future__ import annotations

import math

import pytest
import torch

import cockpit.factors as factors
from cockpit.factors import AffineFactor, bin_edges_of, bin_index, uniform_counts
from cockpit.quantities import Hist1D, Hist2D


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


def test_tiny_values_keep_their_sign_at_the_zero_edge():
    # (x − low)·k would round −1e−9 onto the edge at 0 (one bin too high).
    x = torch.tensor([-1e-9, -1e-30, 0.0, 1e-30, 1e-9], dtype=torch.float32)
    assert bin_index(x, -2.0, 2.0, 100).tolist() == [49, 49, 50, 50, 50]
    assert uniform_counts(x, -2.0, 2.0, 100)[49:51].tolist() == [2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low,high,bins", [(-2.0, 2.0, 100), (-1.3, 0.9, 37), (0.1, 0.4, 300)])
def test_uniform_counts(dtype, low, high, bins):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(5000) * 0.01, torch.randn(5000) * 3]).to(dtype)
    x[::97] = 0.0
    torch.testing.assert_close(
        uniform_counts(x, low, high, bins), reference_counts(x, low, high, bins), rtol=0, atol=0
    )


def test_nan_is_not_counted_and_inf_is_clamped():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.25, float("nan")])
    counts = uniform_counts(x, -1.0, 1.0, 4)
    assert counts.tolist() == [1.0, 0.0, 1.0, 1.0]
    q = Hist2D(bins=(2, 3), range=((-1.0, 1.0), (-1.0, 1.0)))
    g = torch.tensor([[float("nan"), 0.5, -0.5]])
    h = factors._hist2d(g, torch.tensor([0.0, 0.9, -0.9]), q)
    assert h.sum() == 2 and h[1, 2] == 1 and h[0, 0] == 1


@pytest.mark.parametrize("scale", [0.0, 1e-4, 0.03, 1.0, 30.0])
@pytest.mark.parametrize("low,high,bins", [(-2.0, 2.0, 100), (-1.3, 0.9, 37), (0.01, 0.2, 5)])
def test_outer_histogram_equals_materialized(scale, low, high, bins):
    """Sorted-input counting of outer products b aᵀ equals binning every entry."""
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
    got = factors._outer_hist1d(a, b, q)
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


def test_owned_temporaries_are_binned_in_place_but_never_handed_out_ones():
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
