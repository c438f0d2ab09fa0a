"""The compiled histogram kernels (:mod:`cockpit.native`) against the torch path.

The kernels must bin op for op as the torch path does, so the counts are *equal*,
not close: values exactly on edges, tiny values at the zero edge, NaN, infinities and
outliers, float32 and float64, the pieces of the threaded split, strided rows, and
the outer-product form that never builds the entries.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cockpit.factors as factors
from cockpit import native
from cockpit.factors import AffineFactor, bin_edges_of
from cockpit.quantities import Hist1D, Hist2D

ROOT = Path(__file__).resolve().parents[2]
RANGES = [
    (-2.0, 2.0, 100),  # the 1D default
    (-1.0, 1.0, 40),  # the 2D default's gradient axis
    (0.5, 3.0, 7),  # ioff negative
    (-300.0, -100.0, 100),  # ioff far from zero
    (-1.3, 0.9, 37),  # edges that are not binary fractions
    (-2.0, 2.0, 1),
    (-2.0, 2.0, 300),
]


@pytest.fixture(autouse=True)
def built():
    assert native.library() is not None, "the compiled histogram kernels were not built"


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def hard_values(low: float, high: float, bins: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Crowded values, outliers, every edge and its neighbours, NaN, ±inf, ±0, tiny values."""
    g = torch.Generator().manual_seed(bins)
    mid, width = (low + high) / 2, high - low
    edges = bin_edges_of(low, high, bins, dtype=dtype)
    below = torch.nextafter(edges, torch.full_like(edges, -torch.inf))
    above = torch.nextafter(edges, torch.full_like(edges, torch.inf))
    special = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, -1e-9, 1e-9],
        dtype=dtype,
    )
    x = torch.cat(
        [
            (mid + torch.randn(n, generator=g, dtype=torch.float64) * width / 300).to(dtype),
            (mid + torch.randn(n // 3, generator=g, dtype=torch.float64) * width).to(dtype),
            edges,
            below,
            above,
            special,
        ]
    )
    return x[torch.randperm(x.numel(), generator=g)]


def torch_path(fn, *args):
    old = factors.NATIVE
    factors.NATIVE = False
    try:
        return fn(*args)
    finally:
        factors.NATIVE = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low,high,bins", RANGES)
@pytest.mark.parametrize("n", [10, 400_000], ids=["short", "long"])
def test_1d_counts_equal_the_torch_path(dtype, low, high, bins, n, two_threads, monkeypatch):
    x = hard_values(low, high, bins, n, dtype)
    calls = []
    real = native.count1d
    monkeypatch.setattr(native, "count1d", lambda *a: calls.append(1) or real(*a))
    got = factors.uniform_counts(x, low, high, bins)
    assert calls, "the compiled kernel counted"
    expected = torch_path(factors.uniform_counts, x.clone(), low, high, bins)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.sum() == x.numel() - int(x.isnan().sum())


def crowded_values(low: float, high: float, bins: int, dtype: torch.dtype) -> torch.Tensor:
    """Runs of values in 1 to 5 adjacent bins (as gradient entries crowd around zero).

    Each run takes the lower edge, the value above it, the middle and the value below
    the upper edge of its bins, in random order, some runs with a NaN, an infinity or
    an outlier among them; runs of random lengths, so some fill a whole run of the
    kernel's band counting (256 values) and others straddle two.
    """
    g = torch.Generator().manual_seed(bins + 1)
    edges = bin_edges_of(low, high, bins, dtype=dtype)
    inf = torch.full_like(edges, torch.inf)
    inside = torch.stack(
        [
            edges[:-1],
            torch.nextafter(edges[:-1], inf[:-1]),
            (edges[:-1] + edges[1:]) / 2,
            torch.nextafter(edges[1:], -inf[1:]),
        ]
    )  # [4, bins]: values of bin k in column k
    runs = []
    for _ in range(400):
        width = int(torch.randint(1, 6, (), generator=g))  # bins spanned: 1 … 5
        first = int(torch.randint(0, max(1, bins - width + 1), (), generator=g))
        cols = inside[:, first : first + width].reshape(-1)
        length = int(torch.randint(100, 700, (), generator=g))
        run = cols[torch.randint(0, cols.numel(), (length,), generator=g)]
        kind = int(torch.randint(0, 8, (), generator=g))
        if kind < 3:  # a stray value: NaN, an infinity, an outlier
            odd = [float("nan"), float("inf"), high + (high - low)][kind]
            run[int(torch.randint(0, length, (), generator=g))] = odd
        runs.append(run)
    return torch.cat(runs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low,high,bins", RANGES)
def test_1d_counts_of_crowded_runs_equal_the_torch_path(dtype, low, high, bins, two_threads):
    """Runs within fewer than four bins are counted by compares: the counts stay equal."""
    x = crowded_values(low, high, bins, dtype)
    got = native.count1d(x, low, high, bins)[:bins].double()
    expected = torch_path(factors.uniform_counts, x.clone(), low, high, bins)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.sum() == x.numel() - int(x.isnan().sum())


def test_1d_counts_of_a_strided_view_and_of_nothing():
    x = hard_values(-2.0, 2.0, 100, 3000, torch.float32)[:3000].reshape(-1, 3).T  # strided
    torch.testing.assert_close(
        factors.uniform_counts(x, -2.0, 2.0, 100),
        torch_path(factors.uniform_counts, x.clone(), -2.0, 2.0, 100),
        rtol=0,
        atol=0,
    )
    assert factors.uniform_counts(torch.empty(0), -1.0, 1.0, 4).tolist() == [0.0] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 50_001), (1, 300_001), (300, 997)], ids=str)
def test_2d_counts_equal_the_torch_path(dtype, shape, two_threads):
    """Row pieces, column pieces (one long row) and many short rows; NaN parameters too."""
    q = Hist2D()
    rows, cols = shape
    g = hard_values(*q.range[0], q.bins[0], rows * cols, dtype)[: rows * cols].reshape(shape)
    param = hard_values(*q.range[1], q.bins[1], cols, dtype)[:cols].reshape(1, cols)
    got = factors._hist2d(g, param, q)
    expected = torch_path(factors._hist2d, g, param, q)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.sum() == g.numel() - int(g.isnan().sum())


def test_2d_counts_of_strided_rows(two_threads):
    q = Hist2D(bins=(13, 5), range=((-0.5, 0.5), (-1.0, 1.0)))
    full = hard_values(-0.5, 0.5, 13, 60_000, torch.float32)[:60_000].reshape(20, 3000)
    g = full[:, 1000:2500]  # rows 3000 apart, 1500 long
    param = torch.linspace(-1.5, 1.5, 1500)
    got = native.count2d(g, factors._scaled_bins(param, -1.0, 1.0, 5, nan=4), -0.5, 0.5, 13, 5)
    expected = torch_path(factors._hist2d, g.contiguous(), param.reshape(1, -1), q)
    torch.testing.assert_close(got[: 13 * 5].double().view(13, 5), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("finite", [True, False])
def test_outer_2d_counts_equal_the_materialized_entries(
    dtype, groups, finite, two_threads, monkeypatch
):
    """An affine factor without shared positions bins ``b_n a_nᵀ`` without building it."""
    torch.manual_seed(groups)
    n, o, i = 300, 7, 129
    a = torch.randn(n, groups, 1, i, dtype=dtype)
    b = torch.randn(n, groups, 1, o, dtype=dtype) * 0.05
    a[:, :, :, ::17] = 0.0
    if not finite:
        a[3, 0, 0, 5], b[4, -1, 0, 2], a[5, 0, 0, 1] = float("nan"), float("inf"), -float("inf")
    q = Hist2D(bins=(30, 7), range=((-0.1, 0.1), (-1.0, 1.0)))
    param = torch.randn(groups * o, i, dtype=dtype) * 0.7
    param[0, :3] = float("nan")
    factor = AffineFactor(a, b, (groups * o, i))
    built = []
    monkeypatch.setattr(factor, "to_dense", lambda *args: built.append(1))
    calls = []
    real = native.outer2d
    monkeypatch.setattr(native, "outer2d", lambda *args: calls.append(1) or real(*args))
    got = factor.reduce([q], param, {})[q]
    assert len(calls) == groups and not built, "counted from (a, b), one call per group"
    dense = AffineFactor(a, b, (groups * o, i)).to_dense()
    expected = torch_path(factors._hist2d, dense.reshape(n, -1), param.reshape(1, -1), q)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", [1, 3])
def test_outer_2d_rows_with_a_zero_output_gradient_are_counted_once_per_row(
    dtype, groups, two_threads
):
    """Rows with b = ±0 (a ReLU after the layer) hold only zeros, counted per output row;
    where a sample's a holds inf or NaN, 0 · inf = NaN is not counted: no shortcut."""
    torch.manual_seed(7)
    n, o, i = 64, 5, 700
    a = torch.randn(n, groups, 1, i, dtype=dtype)
    b = torch.randn(n, groups, 1, o, dtype=dtype) * 0.05
    b[torch.rand(n, groups, 1, o) < 0.5] = 0.0
    b[::7, :, :, 1] = -0.0
    b[:, :, :, 2] = 0.0  # a whole output row of zeros
    a[3, 0, 0, 10], a[5, -1, 0, 20] = float("inf"), float("nan")  # with b = 0 rows too
    b[3, 0, 0, :], b[5, -1, 0, :2] = 0.0, 0.0
    q = Hist2D(bins=(30, 7), range=((-0.1, 0.1), (-1.0, 1.0)))
    param = torch.randn(groups * o, i, dtype=dtype) * 0.7
    param[1, :5] = float("nan")
    got = AffineFactor(a, b, (groups * o, i)).reduce([q], param, {})[q]
    dense = AffineFactor(a, b, (groups * o, i)).to_dense()
    expected = torch_path(factors._hist2d, dense.reshape(n, -1), param.reshape(1, -1), q)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.sum() == dense.numel() - int(dense.isnan().sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low,high,bins", RANGES)
def test_outer_1d_counts_equal_the_materialized_entries(
    dtype, low, high, bins, two_threads, monkeypatch
):
    """Sorted-row searches bin their probes exactly: products on edges, zeros, outliers."""
    g = torch.Generator().manual_seed(bins)
    rows, i_, o_ = 600, 97, 11
    a = torch.relu(torch.randn(rows, i_, generator=g, dtype=torch.float64)).to(dtype)
    a[:, :5] = torch.randn(rows, 5, generator=g, dtype=dtype)  # negative inputs too
    a[7] = 0.0  # an all-zero input
    edges = bin_edges_of(low, high, bins, dtype=dtype)
    a[0, : edges.numel()] = 2 * edges[:i_]  # b = 0.5 puts these products exactly on edges
    width = (high - low) / bins
    b = torch.randn(rows, o_, generator=g, dtype=torch.float64).to(dtype) * 5 * width
    b[0, 0], b[1, :3], b[2] = 0.5, 0.0, -b[2].abs()
    b[3, 0] = 1e3  # every entry of that row clamped or spread over every bin
    native_counts = native.outer1d(a.sort(1).values, b, low, high, bins)
    assert native_counts[-1] == 0 and native_counts.sum() == rows * i_ * o_
    entries = (b[:, :, None] * a[:, None, :]).reshape(-1)  # the same float products
    expected = torch_path(factors.uniform_counts, entries, low, high, bins)
    torch.testing.assert_close(native_counts[:bins].double(), expected, rtol=0, atol=0)
    calls = []
    real = native.outer1d
    monkeypatch.setattr(native, "outer1d", lambda *args: calls.append(1) or real(*args))
    got = factors._outer_hist1d(a, b, Hist1D(bins=bins, range=(low, high)))
    assert calls, "the factors' outer histogram runs on the kernel"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bad_arguments_are_refused_before_any_count():
    """The kernels index their counts with the parameter bins: never out of range."""
    g, a, b = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="parameter bins must lie in 0 … 4"):
        native.count2d(g, torch.tensor([0, 5, 1]), -1.0, 1.0, 4, 5)
    with pytest.raises(ValueError, match="pbin has 2 entries, not 3"):
        native.count2d(g, torch.tensor([0, 1]), -1.0, 1.0, 4, 5)
    with pytest.raises(ValueError, match="parameter bins must lie in 0 … 1"):
        native.outer2d(a, b, torch.full((12,), -1), -1.0, 1.0, 4, 2)
    with pytest.raises(ValueError, match="needs finite"):
        native.outer1d(a, b.fill_(float("nan")), -1.0, 1.0, 4)
    with pytest.raises(ValueError, match="bad bins 0"):
        native.count1d(g, -1.0, 1.0, 0)
    with pytest.raises(TypeError, match="not torch.int64"):
        native.count1d(torch.zeros(3, dtype=torch.int64), -1.0, 1.0, 4)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


CHECK = """
    import warnings
    import torch
    from cockpit import native
    from cockpit.factors import uniform_counts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = uniform_counts(torch.tensor([-3.0, -0.5, 0.0, 0.25, float("nan")]), -1.0, 1.0, 4)
    print(counts.tolist(), native.library() is not None)
    for w in caught:
        print(w.category.__name__, w.message)
"""


def test_a_failed_build_warns_once_and_counts_on_the_torch_path(tmp_path):
    run = _run(CHECK, {"CC": str(tmp_path / "no-such-cc"), "COCKPIT_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "[1.0, 1.0, 2.0, 0.0] False"
    assert len(lines) == 2 and lines[1].startswith("RuntimeWarning")
    assert "no-such-cc" in lines[1] and "COCKPIT_NATIVE=0" in lines[1]


def test_a_compiler_error_is_reported(tmp_path):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: fatal error: out of cheese' >&2\nexit 1\n")
    cc.chmod(0o755)
    run = _run(CHECK, {"CC": str(cc), "COCKPIT_CACHE_DIR": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr
    assert "out of cheese" in run.stdout and "[1.0, 1.0, 2.0, 0.0] False" in run.stdout
    assert not list((tmp_path / "cache").glob("*.so")), "no half-built library is left"


def test_turned_off_by_the_environment(tmp_path):
    run = _run(CHECK, {"COCKPIT_NATIVE": "0", "COCKPIT_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["[1.0, 1.0, 2.0, 0.0] False"]
    assert not list(tmp_path.iterdir())


def test_the_library_is_built_once_per_cache(tmp_path):
    env = {"COCKPIT_CACHE_DIR": str(tmp_path)}
    first = _run(CHECK, env)
    assert first.returncode == 0 and first.stdout.splitlines() == ["[1.0, 1.0, 2.0, 0.0] True"]
    (lib,) = tmp_path.glob("hist-*.so")
    stamp = lib.stat().st_mtime_ns
    second = _run(CHECK, env)
    assert second.stdout.splitlines() == ["[1.0, 1.0, 2.0, 0.0] True"]
    assert [p.name for p in tmp_path.iterdir()] == [lib.name] and lib.stat().st_mtime_ns == stamp


def test_hist1d_of_the_engine_is_counted_natively(monkeypatch):
    """End to end: a conv net's histograms go through the kernels and equal the torch path."""
    from cockpit import Engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 5)
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    qs = [Hist1D(bins=30, range=(-0.2, 0.2)), Hist2D(bins=(20, 9))]

    def gather() -> dict:
        model.zero_grad()
        with Engine(model, loss_fn) as engine:
            loss = loss_fn(model(x), y)
            with engine.gather(qs) as result:
                loss.backward()
        return {(q, name): v for q in qs for name, v in result[q].items()}

    calls = []
    for kind in ("count1d", "count2d", "outer2d"):
        real = getattr(native, kind)
        monkeypatch.setattr(native, kind, lambda *a, _r=real, _k=kind: calls.append(_k) or _r(*a))
    got = gather()
    assert {"count1d", "count2d", "outer2d"} <= set(calls)
    monkeypatch.setattr(factors, "NATIVE", False)
    expected = gather()
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
