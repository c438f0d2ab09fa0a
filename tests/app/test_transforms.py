"""Tests of app.transforms on synthetic logs in the fixed schema."""

import ast
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app import transforms as T

COLUMNS = ["step", "wall_time", "instrument", "metric", "param", "value"]


def scalars(rows):
    """rows: (step, instrument, metric, param, value) -> DataFrame in the log schema."""
    df = pd.DataFrame([(s, 1.7e9 + 0.5 * s, i, m, p, v) for s, i, m, p, v in rows], columns=COLUMNS)
    return df.astype({"step": "int64", "wall_time": "float64", "value": "float64"})


def tensorboard_ema(values, w):
    """TensorBoard's loop, written out."""
    last, count, out = 0.0, 0, []
    for v in values:
        if not np.isfinite(v):
            out.append(v)
            continue
        last = last * w + (1 - w) * v
        count += 1
        out.append(last / (1 - w**count))
    return np.array(out)


# ------------------------------------------------------------------------------------ EMA
def test_ema_matches_hand_computation():
    # w = 0.5: 0.5/0.5 = 1; (0.25 + 1)/0.75; (0.625 + 1.5)/0.875
    np.testing.assert_allclose(
        T.debiased_ema([1.0, 2.0, 3.0], 0.5), [1.0, 1.25 / 0.75, 2.125 / 0.875]
    )


def test_ema_skips_nan_gaps():
    out = T.debiased_ema([1.0, np.nan, 3.0, np.inf, 5.0], 0.5)
    assert np.isnan(out[1]) and np.isposinf(out[3])
    np.testing.assert_allclose(out[[0, 2, 4]], T.debiased_ema([1.0, 3.0, 5.0], 0.5))
    np.testing.assert_allclose(out[2], (0.25 + 1.5) / 0.75)


def test_ema_matches_tensorboard_loop_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.normal(size=500)
    y[rng.random(500) < 0.1] = np.nan
    for w in (0.0, 0.3, 0.9, 0.999):
        np.testing.assert_allclose(T.debiased_ema(y, w), tensorboard_ema(y, w), rtol=1e-10)


def test_ema_zero_smoothing_is_identity_and_returns_a_copy():
    y = np.array([3.0, np.nan, -1.0])
    out = T.debiased_ema(y, 0.0)
    np.testing.assert_array_equal(out, y)
    out[0] = 99.0
    assert y[0] == 3.0


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_ema_rejects_smoothing_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="smoothing"):
        T.debiased_ema([1.0, 2.0], bad)


@pytest.mark.parametrize("w", [0.0, 0.6, 0.95])
def test_ema_state_resumes_exactly(w):
    rng = np.random.default_rng(1)
    y = rng.normal(size=300)
    y[[5, 6, 100, 299]] = np.nan
    whole = T.debiased_ema(y, w)
    state = None
    parts = []
    for chunk in np.split(y, [1, 7, 150, 151, 299]):
        out, state = T.ema_with_state(chunk, w, state)
        parts.append(out)
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-12, equal_nan=True)
    assert state["count"] == int(np.isfinite(y).sum())


@pytest.mark.parametrize("w", [1e-300, 0.1, 0.6, 0.9, 0.99, 0.9999])
def test_powers_equal_numpy_pow_bit_for_bit_past_underflow(w):
    for start, n in ((1, 0), (1, 5), (7, 3000), (1, 200_000), (100_000, 50)):
        expected = w ** np.arange(start, start + n, dtype=np.float64)
        np.testing.assert_array_equal(T._powers(w, start, n), expected)


def test_ema_of_a_long_series_is_the_tensorboard_loop():
    rng = np.random.default_rng(3)
    y = rng.normal(size=20_000)
    y[::97] = np.nan
    smoothed, state = T.ema_with_state(y, 0.95)
    last, count, ref = 0.0, 0, np.full_like(y, np.nan)
    for i, v in enumerate(y):
        if np.isfinite(v):
            last, count = 0.95 * last + 0.05 * v, count + 1
            ref[i] = last / (1.0 - 0.95**count)
    np.testing.assert_allclose(smoothed, ref, rtol=1e-10)
    assert state["count"] == count


def test_ema_smoothing_reduces_variation():
    y = np.random.default_rng(2).normal(size=1000)
    smooth = T.debiased_ema(y, 0.9)
    assert np.std(np.diff(smooth)) < 0.5 * np.std(np.diff(y))


# ------------------------------------------------------------------------------------ downsampling
def test_downsample_short_series_passes_through():
    x, y = np.arange(10.0), np.random.default_rng(3).normal(size=10)
    dx, dy = T.downsample_minmax(x, y, 10)
    np.testing.assert_array_equal(dx, x)
    np.testing.assert_array_equal(dy, y)


def test_downsample_keeps_every_bucket_extreme_and_order():
    rng = np.random.default_rng(4)
    n, max_points = 10_007, 200
    x, y = np.arange(n) * 2.0, rng.normal(size=n).cumsum()
    idx = T.minmax_indices(y, max_points)
    assert idx.size <= max_points
    assert np.all(np.diff(idx) > 0)
    assert idx[0] == 0 and idx[-1] == n - 1
    # brute-force reference: each bucket's min and max survive
    n_buckets = (max_points - 2) // 2
    starts = (np.arange(n_buckets) * n) // n_buckets
    kept = set(idx.tolist())
    for b0, b1 in zip(starts, list(starts[1:]) + [n], strict=True):
        seg = y[b0:b1]
        assert b0 + int(np.argmin(seg)) in kept
        assert b0 + int(np.argmax(seg)) in kept
    dx, dy = T.downsample_minmax(x, y, max_points)
    np.testing.assert_array_equal(dy, y[idx])
    np.testing.assert_array_equal(dx, x[idx])


def test_downsample_million_points_keeps_global_extremes_and_spikes():
    rng = np.random.default_rng(5)
    n = 1_000_000
    x = np.arange(n, dtype=np.float64)
    y = rng.normal(size=n)
    y[123_457] = 50.0  # a single spike
    y[765_431] = -40.0
    dx, dy = T.downsample_minmax(x, y, 2000)
    assert dx.size <= 2000
    assert dy.max() == 50.0 and dy.min() == -40.0
    assert 123_457.0 in dx and 765_431.0 in dx
    assert np.all(np.diff(dx) > 0)


def test_downsample_keeps_nan_gaps_and_ignores_nan_as_extreme():
    y = np.concatenate([np.ones(500), np.full(500, np.nan), np.ones(500) * 2])
    y[10] = 7.0
    dx, dy = T.downsample_minmax(np.arange(y.size), y, 40)
    assert np.isnan(dy).any()  # the gap still breaks the line
    assert np.nanmax(dy) == 7.0 and np.nanmin(dy) == 1.0


def test_downsample_validates_arguments():
    with pytest.raises(ValueError):
        T.downsample_minmax(np.arange(10), np.arange(10), 3)
    with pytest.raises(ValueError):
        T.downsample_minmax(np.arange(10), np.arange(9), 100)


# ------------------------------------------------------------------------------------ series
def test_series_filters_sorts_and_deduplicates():
    df = scalars(
        [
            (3, "loss", "loss", "all", 0.3),
            (1, "loss", "loss", "all", 0.9),
            (2, "loss", "loss", "all", 0.5),
            (2, "loss", "loss", "all", 0.4),  # re-read: the last row wins
            (1, "grad_norm", "grad_norm", "all", 7.0),
            (1, "loss", "loss", "0.weight", 1.0),
            (1, "batch_size", "norm_test", "all", 64.0),
        ]
    ).sample(frac=1.0, random_state=0)
    df = pd.concat([df[df["value"] != 0.4], df[df["value"] == 0.4]])
    x, y = T.series(df, "loss")
    np.testing.assert_array_equal(x, [1, 2, 3])
    np.testing.assert_array_equal(y, [0.9, 0.4, 0.3])
    _, y = T.series(df, "loss", param="0.weight")
    np.testing.assert_array_equal(y, [1.0])
    _, y = T.series(df, "batch_size", "norm_test")
    np.testing.assert_array_equal(y, [64.0])


def _series_with_pandas(df, instrument, metric=None, param="all", x="step"):
    """The reference: mask, stable sort by step, last row per step, then sort by x."""
    metric = instrument if metric is None else metric
    mask = (df["instrument"] == instrument) & (df["metric"] == metric) & (df["param"] == param)
    cols = ["step", "value"] if x == "step" else ["step", "wall_time", "value"]
    sub = df.loc[mask, cols].sort_values("step", kind="stable")
    sub = sub.drop_duplicates("step", keep="last").sort_values(x, kind="stable")
    return sub[x].to_numpy(dtype=np.float64), sub["value"].to_numpy(dtype=np.float64)


@pytest.mark.parametrize("categorical", [False, True])
def test_series_equals_the_pandas_reference_on_random_logs(categorical):
    rng = np.random.default_rng(int(categorical))
    for _ in range(50):
        n = int(rng.integers(0, 200))
        df = pd.DataFrame(
            {
                "step": rng.integers(0, 30, n),
                "wall_time": rng.integers(0, 4, n).astype(float),  # ties: stable order
                "instrument": rng.choice(["a", "b"], n),
                "metric": rng.choice(["a", "m"], n),
                "param": rng.choice(["all", "p"], n),
                "value": np.where(rng.random(n) < 0.1, np.nan, rng.random(n)),
            }
        )
        if categorical:
            df = df.astype({c: "category" for c in ("instrument", "metric", "param")})
        for args in (("a",), ("a", "m"), ("b", None, "p"), ("missing",)):
            for x in ("step", "wall_time"):
                got, want = T.series(df, *args, x=x), _series_with_pandas(df, *args, x=x)
                for g, w in zip(got, want, strict=True):
                    np.testing.assert_array_equal(g, w)
                    assert g.dtype == np.float64


def test_series_wall_time_and_empty_inputs():
    df = scalars([(s, "loss", "loss", "all", float(s)) for s in range(5)])
    x, y = T.series(df, "loss", x="wall_time")
    np.testing.assert_allclose(x, 1.7e9 + 0.5 * np.arange(5))
    for empty in (None, df.iloc[:0]):
        x, y = T.series(empty, "loss")
        assert x.size == 0 and y.size == 0
    assert T.series(df, "missing")[0].size == 0
    with pytest.raises(ValueError, match="x must be"):
        T.series(df, "loss", x="epoch")


def test_tail_latest_and_names():
    df = scalars(
        [(s, "alpha", "alpha", "all", float(s)) for s in range(10)]
        + [(10, "alpha", "alpha", "all", np.nan)]
        + [(0, "hyperparameters", "lr", f"group{k}", 0.1) for k in (10, 2, 0)]
        + [(0, "hyperparameters", "momentum", "group0", 0.9)]
    )
    steps, values = T.tail_values(df, "alpha", window=3)
    np.testing.assert_array_equal(steps, [7, 8, 9])
    np.testing.assert_array_equal(values, [7, 8, 9])
    assert T.latest_value(df, "alpha") == 9.0
    assert T.latest_value(df, "nothing") is None
    assert T.params_of(df, "hyperparameters", "lr") == ["group0", "group2", "group10"]
    assert T.metrics_of(df, "hyperparameters") == ["lr", "momentum"]


# ------------------------------------------------------------------------------------ histograms
def hist_frame(records):
    """records: (step, instrument, param, counts, edges_0, edges_1)."""
    return pd.DataFrame(
        [(s, 1.7e9 + s, i, p, c, e0, e1) for s, i, p, c, e0, e1 in records],
        columns=["step", "wall_time", "instrument", "param", "counts", "edges_0", "edges_1"],
    )


def test_latest_hist_history_and_by_param():
    e = np.linspace(-2, 2, 5)
    empty = np.array([])
    df = hist_frame(
        [
            (0, "grad_hist_1d", "all", np.array([1, 2, 3, 4.0]), e, empty),
            (0, "grad_hist_1d", "1.weight", np.array([0, 5, 5, 0.0]), e, empty),
            (0, "grad_hist_1d", "0.weight", np.array([1, 1, 1, 1.0]), e, empty),
            (5, "grad_hist_1d", "all", np.array([4, 3, 2, 1.0]), e, empty),
            (9, "grad_hist_1d", "all", np.array([9, 9.0]), np.linspace(-2, 2, 3), empty),
            (7, "grad_hist_1d", "all", np.array([1, 1, 1, 1.0]), e, empty),
        ]
    )
    rec = T.latest_hist(df, "grad_hist_1d")
    assert rec.step == 9 and rec.counts.tolist() == [9, 9]
    assert T.latest_hist(df, "grad_hist_2d") is None
    by_param = T.latest_hists_by_param(df, "grad_hist_1d")
    assert list(by_param) == ["1.weight", "0.weight"]  # log order, "all" left out
    steps, counts, edges = T.hist_history(df, "grad_hist_1d", "all")
    # the latest histogram has 2 bins: the 4-bin rows are dropped
    assert steps.tolist() == [9] and len(counts) == 1 and edges.size == 3
    df2 = df[df["step"] != 9]
    steps, counts, edges = T.hist_history(df2, "grad_hist_1d", "all")
    assert steps.tolist() == [0, 5, 7]
    np.testing.assert_array_equal(counts[1], [4, 3, 2, 1])
    np.testing.assert_array_equal(edges, e)


def test_as_counts_stacks_parquet_style_rows():
    rows = np.empty(2, dtype=object)
    rows[0], rows[1] = np.array([1, 2, 3]), np.array([4, 5, 6])
    out = T.as_counts(rows)
    assert out.shape == (2, 3) and out.dtype == np.float64
    assert T.as_counts([[1, 2], [3, 4]]).shape == (2, 2)


def test_edge_and_central_mass():
    counts = np.array([5.0, 0, 10, 10, 0, 15])
    assert T.edge_mass(counts) == pytest.approx(20 / 40)
    # 0 is an edge of the 6 bins on (-3, 3): the two bins touching it are central
    assert T.central_mass(counts, np.linspace(-3, 3, 7)) == pytest.approx(20 / 40)
    # 5 bins on (-2.5, 2.5): 0 lies inside the middle bin
    assert T.central_mass([1.0, 1, 8, 0, 0], np.linspace(-2.5, 2.5, 6)) == pytest.approx(0.8)
    # 2D: the gradient axis is axis 0
    c2 = np.zeros((4, 3))
    c2[1:3, :] = 1.0
    c2[0, 0] = 2.0
    assert T.central_mass(c2, np.linspace(-1, 1, 5)) == pytest.approx(6 / 8)
    assert T.edge_mass(c2) == pytest.approx(2 / 8)
    assert np.isnan(T.edge_mass(np.zeros(4)))
    assert np.isnan(T.central_mass([1.0, 1.0], [1.0, 2.0, 3.0]))  # 0 outside the range


# ------------------------------------------------------------------------------------ CSV
def test_csv_of_runs_round_trips():
    runs = {
        "a": scalars([(s, "loss", "loss", "all", 1.0 / (s + 1)) for s in range(4)]),
        "b": scalars([(s, "loss", "loss", "all", 2.0) for s in range(2)]),
    }
    text = T.csv_of(runs, "loss", smoothing=0.5)
    table = pd.read_csv(io.StringIO(text))
    assert list(table.columns) == ["run", "step", "value", "smoothed"]
    assert table["run"].tolist() == ["a"] * 4 + ["b"] * 2
    np.testing.assert_allclose(table["value"][:4], [1, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_allclose(table["smoothed"][:4], T.debiased_ema([1, 1 / 2, 1 / 3, 1 / 4], 0.5))
    wall = pd.read_csv(io.StringIO(T.csv_of(runs["a"], "loss", x="wall_time")))
    assert list(wall.columns) == ["run", "wall_time", "value", "smoothed"]


def test_modules_are_dash_free():
    for name in ("transforms.py", "figures.py", "hints.py"):
        tree = ast.parse((Path(T.__file__).parent / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert "dash" not in imported, name
        assert "plotly" in imported or name != "figures.py"
