"""Tests of app.figures: the data inside the figures, not pixels."""

import io
import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from app import figures as F
from app import transforms as T

COLUMNS = ["step", "wall_time", "instrument", "metric", "param", "value"]


def scalars(rows):
    """rows: (step, instrument, metric, param, value) -> DataFrame in the log schema."""
    df = pd.DataFrame([(s, 1.7e9 + 0.5 * s, i, m, p, v) for s, i, m, p, v in rows], columns=COLUMNS)
    return df.astype({"step": "int64", "wall_time": "float64", "value": "float64"})


def loss_run(n=100, seed=0, start=0, metric_rows=()):
    rng = np.random.default_rng(seed)
    rows = [
        (s, "loss", "loss", "all", math.exp(-s / 50) + 0.1 * rng.random())
        for s in range(start, start + n)
    ]
    return scalars(rows + list(metric_rows))


def full_run(n=60, seed=0):
    """Every scalar instrument of the schema, with plausible values."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n):
        rows += [
            (s, "loss", "loss", "all", math.exp(-s / 30) + 0.05 * rng.random()),
            (s, "grad_norm", "grad_norm", "all", 1 + rng.random()),
            (s, "distance", "distance", "all", 0.1 * s),
            (s, "update_size", "update_size", "all", 0.1),
            (s, "alpha", "alpha", "all", rng.normal(0.1, 0.4)),
            (s, "norm_test", "norm_test", "all", 0.5 + 0.1 * rng.random()),
            (s, "inner_test", "inner_test", "all", 0.3),
            (s, "ortho_test", "ortho_test", "all", 2.0),
            (s, "batch_size", "norm_test", "all", 40.0),
            (s, "batch_size", "inner_test", "all", 20.0),
            (s, "batch_size", "ortho_test", "all", 10.0),
            (s, "mean_gsnr", "mean_gsnr", "all", 0.2),
            (s, "hess_trace", "hess_trace", "all", 10.0),
            (s, "hess_max_ev", "hess_max_ev", "all", 3.0),
            (s, "hess_max_ev", "converged", "all", 1.0),
            (s, "tic_diag", "tic_diag", "all", 1.0),
            (s, "tic_trace", "tic_trace", "all", 1.0),
            (s, "early_stopping", "early_stopping", "all", -1.0),
            (s, "cabs", "cabs", "all", 32.0),
            (s, "hyperparameters", "lr", "group0", 0.1 * 0.99**s),
            (s, "hyperparameters", "lr", "group1", 0.01),
            (s, "hyperparameters", "momentum", "group0", 0.9),
            (s, "hyperparameters", "batch_size", "all", 32.0),
            (s, "user", "accuracy", "all", s / n),
        ]
    return scalars(rows)


def hists_run(steps=(0, 10, 20), params=("0.weight", "2.weight")):
    rng = np.random.default_rng(1)
    e1d, e_g, e_p = np.linspace(-2, 2, 101), np.linspace(-1, 1, 41), np.linspace(-2, 2, 51)
    recs = []
    for s in steps:
        recs.append((s, "grad_hist_1d", "all", rng.integers(0, 50, 100).astype(float), e1d, []))
        for p in ("all", *params):
            counts = rng.integers(0, 5, (40, 50)).astype(float)
            recs.append((s, "grad_hist_2d", p, counts, e_g, e_p))
    return pd.DataFrame(
        [
            (s, 1.7e9 + s, i, p, np.asarray(c), np.asarray(a), np.asarray(b))
            for s, i, p, c, a, b in recs
        ],
        columns=["step", "wall_time", "instrument", "param", "counts", "edges_0", "edges_1"],
    )


def annotation_texts(fig):
    return [a.text for a in fig.layout.annotations]


# ------------------------------------------------------------------------------------ colours
def test_run_colors_are_stable_and_distinct():
    names = [f"run{k}" for k in range(10)]
    colors = F.run_colors(names)
    assert len(set(colors.values())) == 10
    assert F.run_colors(names[::-1]) == colors
    assert all(c in F.PALETTE for c in colors.values())


def test_same_run_same_colour_across_figures():
    runs = {"baseline": full_run(seed=0), "lr=0.5": full_run(seed=1)}
    colors = F.run_colors(runs)
    line = F.line_figure(runs, "loss", colors=colors)
    tests = F.tests_history_figure(runs, colors=colors)
    perf = F.performance_figure(runs, colors=colors)
    for fig in (line, tests, perf):
        for trace, meta in zip(fig.data, fig.layout.meta["traces"], strict=True):
            assert trace.line.color == colors[meta["run"]]
    # without the shared mapping, builders still agree (same runs -> same colours)
    assert F.line_figure(runs, "loss").data[0].line.color == line.data[0].line.color


# ------------------------------------------------------------------------------------ line figure
def test_line_figure_raw_and_smoothed_traces():
    runs = {"a": loss_run(seed=0), "b": loss_run(seed=1)}
    plain = F.line_figure(runs, "loss")
    assert len(plain.data) == 2
    assert [m["role"] for m in plain.layout.meta["traces"]] == ["line", "line"]
    x, y = T.series(runs["a"], "loss")
    np.testing.assert_array_equal(plain.data[0].x, x)
    np.testing.assert_array_equal(plain.data[0].y, y)

    smooth = F.line_figure(runs, "loss", smoothing=0.8)
    assert [m["role"] for m in smooth.layout.meta["traces"]] == ["raw", "smooth"] * 2
    raw, sm = smooth.data[0], smooth.data[1]
    np.testing.assert_array_equal(raw.y, y)
    assert raw.opacity < 1 and sm.opacity == 1
    assert not np.allclose(sm.y, y)
    np.testing.assert_allclose(sm.y, T.debiased_ema(y, 0.8))
    assert raw.showlegend is False and sm.showlegend is True and sm.name == "a"


def test_line_figure_axes_log_and_wall_time():
    run = loss_run()
    assert F.line_figure(run, "loss", log_y=True).layout.yaxis.type == "log"
    assert F.line_figure(run, "loss").layout.yaxis.type == "linear"
    fig = F.line_figure(run, "loss", x="wall_time")
    assert fig.layout.xaxis.type == "date"
    np.testing.assert_allclose(fig.data[0].x, (1.7e9 + 0.5 * np.arange(100)) * 1000.0)
    assert F.line_figure(run, "loss").layout.xaxis.title.text == "step"


def test_uirevision_depends_on_the_view_not_the_data():
    short, long = loss_run(n=10), loss_run(n=200, seed=3)
    base = F.line_figure({"a": short}, "loss").layout.uirevision
    assert F.line_figure({"a": long, "b": short}, "loss", smoothing=0.9).layout.uirevision == base
    assert F.line_figure({"a": short}, "loss", log_y=True).layout.uirevision != base
    assert F.line_figure({"a": short}, "loss", x="wall_time").layout.uirevision != base
    assert F.line_figure({"a": short}, "grad_norm").layout.uirevision != base
    assert F.alpha_gauge([0.1]).layout.uirevision == F.alpha_gauge([0.5, 2]).layout.uirevision


def test_line_figure_empty_states():
    fig = F.line_figure({"a": loss_run()}, "hess_trace")
    assert "no data yet" in annotation_texts(fig)
    assert fig.layout.meta["empty"] is True
    fig = F.line_figure({"a": loss_run()}, "hess_trace", tracked=False)
    assert "not tracked" in annotation_texts(fig)
    fig = F.line_figure({}, "loss")
    assert "no data yet" in annotation_texts(fig) and len(fig.data) == 0
    assert "no data yet" not in annotation_texts(F.line_figure(loss_run(), "loss"))


def test_line_figure_downsamples_long_series_keeping_extremes():
    n = 100_000
    y = np.sin(np.arange(n) / 500.0)
    y[31_337] = 9.0
    y[77_777] = -9.0
    df = scalars([(s, "loss", "loss", "all", v) for s, v in enumerate(y)])
    fig = F.line_figure(df, "loss", max_points=1000)
    trace = fig.data[0]
    assert len(trace.y) <= 500  # half the budget: headroom for live extension
    assert max(trace.y) == 9.0 and min(trace.y) == -9.0
    assert list(trace.x) == sorted(trace.x)
    assert fig.layout.meta["traces"][0]["last_x"] == n - 1


def test_line_figure_state_is_json_serializable():
    fig = F.line_figure({"a": loss_run()}, "loss", smoothing=0.5)
    state = json.loads(json.dumps(fig.layout.meta))
    assert state["builder"] == "lines" and state["smoothing"] == 0.5
    assert state["traces"][1]["ema"]["count"] == 100


# ------------------------------------------------------------------------------------ extendData
@pytest.mark.parametrize("smoothing", [0.0, 0.7])
def test_extend_lines_sends_only_new_points_and_matches_rebuild(smoothing):
    full = {"a": loss_run(n=80, seed=0), "b": loss_run(n=80, seed=1)}
    old = {k: v[v["step"] < 50] for k, v in full.items()}
    fig = F.line_figure(old, "loss", smoothing=smoothing, max_points=500)
    # overlapping rows are fine: only steps after the last shown one are sent
    new = {"a": full["a"][full["a"]["step"] >= 40], "b": full["b"][full["b"]["step"] >= 50]}
    payload, state = F.extend_lines(new, fig.layout.meta)
    update, indices, max_points = payload
    assert max_points == 500 and state["redraw"] is False
    assert indices == list(range(len(fig.data)))
    for xs in update["x"]:
        assert xs == list(range(50, 80))
    rebuilt = F.line_figure(full, "loss", smoothing=smoothing, max_points=500)
    for i, ys in zip(indices, update["y"], strict=True):
        np.testing.assert_allclose(ys, rebuilt.data[i].y[50:], rtol=1e-12)
    # the same rows again: nothing to send
    again, state2 = F.extend_lines(new, state)
    assert again is None and state2["redraw"] is False
    assert all(t["n"] == 80 for t in state2["traces"])


def test_extend_lines_on_wall_time_sends_milliseconds():
    fig = F.line_figure({"a": loss_run(n=10)}, "loss", x="wall_time")
    payload, state = F.extend_lines({"a": loss_run(n=12)}, fig.layout.meta)
    assert payload[0]["x"] == [[(1.7e9 + 0.5 * 10) * 1000.0, (1.7e9 + 0.5 * 11) * 1000.0]]
    assert state["traces"][0]["last_x"] == 1.7e9 + 0.5 * 11  # the state keeps seconds


def test_extend_lines_asks_for_redraw_when_it_cannot_grow():
    fig = F.line_figure({"a": loss_run(n=20)}, "loss", max_points=30)
    # a new run
    _, state = F.extend_lines({"b": loss_run(n=5)}, fig.layout.meta)
    assert state["redraw"] is True
    # over the point budget
    payload, state = F.extend_lines({"a": loss_run(n=20, start=20)}, fig.layout.meta)
    assert payload is None and state["redraw"] is True
    # within budget
    payload, state = F.extend_lines({"a": loss_run(n=5, start=20)}, fig.layout.meta)
    assert payload is not None and len(payload[0]["x"][0]) == 5 and not state["redraw"]
    # the figure was empty: the "no data yet" annotation must go
    empty = F.line_figure({"a": loss_run(n=0)}, "loss")
    payload, state = F.extend_lines({"a": loss_run(n=3)}, empty.layout.meta)
    assert payload is None and state["redraw"] is True
    # unrelated rows of a new run do not force a redraw
    other = scalars([(1, "grad_norm", "grad_norm", "all", 1.0)])
    assert F.extend_lines({"c": other}, fig.layout.meta)[1]["redraw"] is False
    with pytest.raises(ValueError):
        F.extend_lines({}, {"builder": "hist_time"})


def test_extend_lines_sends_nan_as_null():
    fig = F.line_figure({"a": loss_run(n=5)}, "loss")
    rows = scalars([(5, "loss", "loss", "all", np.nan), (6, "loss", "loss", "all", 1.0)])
    payload, _ = F.extend_lines({"a": rows}, fig.layout.meta)
    assert payload[0]["y"] == [[None, 1.0]]
    json.dumps(payload)


def test_extend_lines_notices_new_user_metric_and_param_group():
    run = full_run(n=10)
    perf = F.performance_figure({"a": run[run["instrument"] != "user"]})
    later = scalars([(10, "user", "val_accuracy", "all", 0.5)])
    assert F.extend_lines({"a": later}, perf.layout.meta)[1]["redraw"] is True
    hp = F.hyperparameter_figure({"a": run})
    new_group = scalars([(10, "hyperparameters", "lr", "group2", 0.1)])
    assert F.extend_lines({"a": new_group}, hp.layout.meta)[1]["redraw"] is True
    same_group = scalars([(10, "hyperparameters", "lr", "group1", 0.1)])
    payload, state = F.extend_lines({"a": same_group}, hp.layout.meta)
    assert state["redraw"] is False and payload[0]["y"] == [[0.1]]


# ------------------------------------------------------------------------------------ multi-row
def test_tests_history_rows_and_thresholds():
    runs = {"a": full_run(), "b": full_run(seed=2)}
    fig = F.tests_history_figure(runs)
    assert len(fig.data) == 6
    metas = fig.layout.meta["traces"]
    axes = [(t.yaxis, m["instrument"]) for t, m in zip(fig.data, metas, strict=True)]
    assert set(axes) == {("y", "norm_test"), ("y2", "inner_test"), ("y3", "ortho_test")}
    lines = sorted((s.yref, round(s.y0, 6)) for s in fig.layout.shapes)
    assert lines == [("y", 0.9), ("y2", 0.9), ("y3", round(math.tan(math.radians(80)), 6))]
    assert fig.layout.yaxis.type == fig.layout.yaxis3.type == "log"
    assert fig.layout.xaxis2.matches == "x" and fig.layout.xaxis3.matches == "x"


def test_batch_size_figure_shows_suggestions_and_actual_batch():
    fig = F.batch_size_figure({"a": full_run()})
    metas = fig.layout.meta["traces"]
    assert [(m["instrument"], m["metric"]) for m in metas] == [
        ("batch_size", "norm_test"),
        ("hyperparameters", "batch_size"),
        ("batch_size", "inner_test"),
        ("hyperparameters", "batch_size"),
        ("batch_size", "ortho_test"),
        ("hyperparameters", "batch_size"),
    ]
    assert fig.data[0].y[0] == 40.0 and fig.data[1].y[0] == 32.0
    assert fig.data[1].line.dash == "dot"


def test_hyperparameter_figure_rows_per_metric_lines_per_group():
    fig = F.hyperparameter_figure({"a": full_run(n=5)})
    metas = fig.layout.meta["traces"]
    assert [(m["metric"], m["param"]) for m in metas] == [
        ("lr", "group0"),
        ("lr", "group1"),
        ("momentum", "group0"),
        ("batch_size", "all"),
    ]
    assert [t.yaxis for t in fig.data] == ["y", "y", "y2", "y3"]
    np.testing.assert_allclose(fig.data[0].y, 0.1 * 0.99 ** np.arange(5))
    assert fig.data[0].line.dash != fig.data[1].line.dash
    only_lr = F.hyperparameter_figure({"a": full_run(n=5)}, metrics=["lr"], log_y=True)
    assert len(only_lr.data) == 2 and only_lr.layout.yaxis.type == "log"


def test_performance_figure_secondary_axis_for_user_metrics():
    fig = F.performance_figure({"a": full_run()}, smoothing=0.5)
    metas = fig.layout.meta["traces"]
    assert [(m["instrument"], m["role"]) for m in metas] == [
        ("loss", "raw"),
        ("loss", "smooth"),
        ("user", "raw"),
        ("user", "smooth"),
    ]
    assert [t.yaxis for t in fig.data] == ["y", "y", "y2", "y2"]
    assert fig.layout.yaxis2.overlaying == "y" and fig.layout.yaxis2.side == "right"


# ------------------------------------------------------------------------------------ alpha
def test_alpha_gauge_parabola_and_distributions():
    alphas = np.concatenate([np.full(90, -0.6), np.full(10, 1.05)])
    fig = F.alpha_gauge(alphas, bins=30)
    parabola, all_hist, recent_hist, means = fig.data
    np.testing.assert_allclose(parabola.y, np.asarray(parabola.x) ** 2)
    assert parabola.x[0] == -1.5 and parabola.x[-1] == 1.5
    width = 3.0 / 30
    assert np.sum(all_hist.y) * width == pytest.approx(1.0)
    assert np.sum(recent_hist.y) * width == pytest.approx(1.0)
    # the recent 10 % are exactly the last 10 values, all at 1.05
    peak = int(np.argmax(recent_hist.y))
    assert recent_hist.x[peak] - width / 2 <= 1.05 <= recent_hist.x[peak] + width / 2
    assert recent_hist.y[peak] == pytest.approx(1 / width)
    assert means.x[0] == pytest.approx(alphas.mean()) and means.x[1] == pytest.approx(1.05)
    assert means.y[1] == pytest.approx(1.05**2)
    texts = annotation_texts(fig)
    assert any(f"all {alphas.mean():.2f}" in t and "1.05" in t for t in texts)
    assert "(μ=1.05)" in recent_hist.name


def test_alpha_gauge_outliers_and_empty():
    fig = F.alpha_gauge([0.0, 0.1, 3.0, 4.0, -2.0, np.nan])
    names = {a.name: a.text for a in fig.layout.annotations}
    assert "2 above" in names["outliers_high"] and "1 below" in names["outliers_low"]
    # the all-steps density integrates to the in-range share
    assert np.sum(fig.data[1].y) * 0.1 == pytest.approx(2 / 5)
    empty = F.alpha_gauge([])
    assert "no data yet" in annotation_texts(empty) and len(empty.data) == 1
    assert "not tracked" in annotation_texts(F.alpha_gauge([np.nan], tracked=False))


# ------------------------------------------------------------------------------- gradient tests
def trace_named(fig, prefix):
    found = [t for t in fig.data if t.name and t.name.startswith(prefix)]
    assert len(found) == 1, [t.name for t in fig.data]
    return found[0]


def test_gradient_tests_geometry():
    fig = F.gradient_tests_figure(0.5, 0.3, 1.2)
    disc = trace_named(fig, "norm test")
    assert np.hypot(disc.x, disc.y) == pytest.approx(np.full(len(disc.x), 0.5))
    assert disc.fill == "toself"
    inner = trace_named(fig, "inner test")
    assert max(np.abs(inner.y)) == pytest.approx(0.3)
    ortho = trace_named(fig, "ortho test")
    assert max(np.abs(ortho.x)) == pytest.approx(1.2)
    ref = trace_named(fig, "norm threshold")
    assert np.hypot(ref.x, ref.y) == pytest.approx(np.full(len(ref.x), 0.9))
    inner_ref = trace_named(fig, "inner threshold")
    assert {abs(v) for v in inner_ref.y if v is not None} == {0.9}
    r = fig.layout.xaxis.range[1]
    assert r >= 1.2 and tuple(fig.layout.yaxis.range) == tuple(fig.layout.xaxis.range)
    assert fig.layout.yaxis.scaleanchor == "x"
    assert "✓" in disc.name and "✓" in ortho.name
    assert "✗" in trace_named(F.gradient_tests_figure(1.5, None, None), "norm test").name


def test_gradient_tests_missing_values():
    fig = F.gradient_tests_figure(None, float("nan"), 2.0)
    names = [t.name for t in fig.data]
    assert not any(n.startswith(("norm", "inner")) for n in names)
    assert any(n.startswith("ortho test") for n in names)
    empty = F.gradient_tests_figure(None, None, float("nan"))
    assert "no data yet" in annotation_texts(empty)


# ------------------------------------------------------------------------------------ histograms
def test_hist_1d_figure_highlights_edge_bins():
    counts = np.arange(1.0, 11.0)
    edges = np.linspace(-2, 2, 11)
    fig = F.hist_1d_figure(counts, edges, log_y=True)
    inner, edge = fig.data
    assert list(inner.y) == list(counts[1:-1]) and list(edge.y) == [1.0, 10.0]
    np.testing.assert_allclose(edge.x, [-1.8, 1.8])
    assert fig.layout.yaxis.type == "log"
    assert f"{11 / 55:.1%}" in annotation_texts(fig)[0]
    assert "no data yet" in annotation_texts(F.hist_1d_figure(None, None))
    assert "no data yet" in annotation_texts(F.hist_1d_figure(np.zeros(4), np.arange(5.0)))


def test_hist_2d_figure_heatmap_and_marginals():
    counts = np.zeros((4, 5))
    counts[1, 2], counts[2, 2], counts[0, 4] = 10.0, 100.0, 1.0
    e0, e1 = np.linspace(-1, 1, 5), np.linspace(-2, 2, 6)
    fig = F.hist_2d_figure(counts, e0, e1)
    heat, top, right = fig.data
    z = np.array(heat.z, dtype=float)
    assert z[2, 2] == pytest.approx(2.0) and z[1, 2] == pytest.approx(1.0)
    assert np.isnan(z[3, 3])  # empty bins blank on the log scale
    np.testing.assert_array_equal(np.array(heat.customdata), counts)
    np.testing.assert_array_equal(heat.x, e1)
    np.testing.assert_array_equal(heat.y, e0)
    np.testing.assert_array_equal(top.y, counts.sum(axis=0))
    np.testing.assert_array_equal(right.x, counts.sum(axis=1))
    assert right.orientation == "h" and top.yaxis == "y2" and right.xaxis == "x2"
    lin = F.hist_2d_figure(counts, e0, e1, log_color=False)
    np.testing.assert_array_equal(np.array(lin.data[0].z), counts)
    assert "no data yet" in annotation_texts(F.hist_2d_figure(None, None, None))


def test_hist_over_time_rows_normalization_and_extension():
    edges = np.linspace(-2, 2, 5)
    counts = [np.array([1.0, 1, 1, 1]), np.array([0.0, 2, 2, 0]), np.array([0.0, 0, 0, 5])]
    fig = F.hist_over_time_figure([0, 10, 20], counts, edges, log_color=False)
    heat = fig.data[0]
    assert list(heat.y) == [0, 10, 20]
    np.testing.assert_allclose(np.array(heat.z), [[0.25] * 4, [0, 0.5, 0.5, 0], [0, 0, 0, 1]])
    log = F.hist_over_time_figure([0], counts[:1], edges)
    np.testing.assert_allclose(np.array(log.data[0].z), [[math.log10(0.25)] * 4], rtol=1e-3)

    payload, state = F.extend_hist_over_time(
        [10, 20, 30], counts[1:] + [np.array([4.0, 0, 0, 0])], fig.layout.meta
    )
    update, indices, max_rows = payload
    assert indices == [0] and update["y"] == [[30]]
    assert update["z"] == [[[1.0, 0.0, 0.0, 0.0]]]
    assert state["last_step"] == 30 and state["n"] == 4
    assert F.extend_hist_over_time([30], [np.ones(4)], state)[0] is None
    # a changed bin count or the first data cannot be appended
    assert F.extend_hist_over_time([40], [np.ones(7)], state)[1]["redraw"] is True
    empty = F.hist_over_time_figure([], [], None)
    assert "no data yet" in annotation_texts(empty)
    assert F.extend_hist_over_time([1], [np.ones(4)], empty.layout.meta)[1]["redraw"] is True


def test_round_significant_keeps_four_digits_and_special_values():
    values = np.array([[1234.5678, -0.000123456, 0.0], [np.nan, np.inf, -np.inf]])
    out = F.round_significant(values)
    assert out[0].tolist() == [1235.0, -0.0001235, 0.0]
    assert np.isnan(out[1, 0]) and out[1, 1] == np.inf and out[1, 2] == -np.inf
    assert F.round_significant([2.0 / 3.0], 2).tolist() == [0.67]
    assert json.dumps(F.round_significant(np.log10([0.0123456789])).tolist()) == "[-1.908]"
    assert values[0, 0] == 1234.5678  # not modified in place


def test_heatmap_colours_are_rounded_but_hover_counts_are_exact():
    rng = np.random.default_rng(0)
    counts = rng.random((4, 5)) * 1000
    e0, e1 = np.linspace(-1, 1, 5), np.linspace(-2, 2, 6)
    heat = F.hist_2d_figure(counts, e0, e1).data[0]
    np.testing.assert_allclose(np.array(heat.z), np.log10(counts), rtol=1e-3)
    np.testing.assert_array_equal(np.array(heat.customdata), counts)
    rows = [rng.random(5) for _ in range(3)]
    fig = F.hist_over_time_figure([0, 1, 2], rows, np.linspace(0, 1, 6))
    ref = np.log10(np.stack(rows) / np.stack(rows).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(np.array(fig.data[0].z), ref, rtol=1e-3)
    payload, _ = F.extend_hist_over_time([3], [rows[0]], fig.layout.meta)
    assert payload[0]["z"][0][0] == np.array(fig.data[0].z)[0].tolist()  # same rounding


def test_hist_over_time_thins_rows_to_budget():
    steps = np.arange(1000)
    counts = [np.ones(3)] * 1000
    fig = F.hist_over_time_figure(steps, counts, np.arange(4.0), max_rows=100)
    ys = list(fig.data[0].y)
    assert len(ys) <= 50 and ys[0] == 0 and ys[-1] == 999
    _, state = F.extend_hist_over_time(np.arange(1000, 1100), [np.ones(3)] * 100, fig.layout.meta)
    assert state["redraw"] is True


def test_layer_grid_reveals_vanishing_layer():
    e0, e1 = np.linspace(-1, 1, 41), np.linspace(-2, 2, 51)
    healthy = np.ones((40, 50))
    vanished = np.zeros((40, 50))
    vanished[19:21, :] = 1.0
    grid = {"0.weight": (healthy, e0, e1), "4.weight": T.HistRecord(3, vanished, e0, e1)}
    fig = F.layer_grid_figure(grid, cols=4)
    assert [t.name for t in fig.data] == ["0.weight", "4.weight"]
    titles = [a.text for a in fig.layout.annotations if a.name == "layer"]
    assert titles == ["0.weight · 5% at 0", "4.weight · 100% at 0"]
    assert fig.data[0].xaxis == "x" and fig.data[1].xaxis == "x2"
    assert all(t.coloraxis == "coloraxis" for t in fig.data)
    z = np.array(fig.data[1].z, dtype=float)
    assert np.nanmax(z) == pytest.approx(math.log10(1 / 100))  # normalized per layer
    many = F.layer_grid_figure({f"{k}.weight": (healthy, e0, e1) for k in range(9)}, cols=4)
    assert len(many.data) == 9 and many.layout.height > fig.layout.height
    assert "not tracked" in annotation_texts(F.layer_grid_figure({}, tracked=False))


# ------------------------------------------------------------------------------------ panels
def test_every_default_panel_builds_on_a_full_log():
    runs = {"a": full_run(), "b": full_run(seed=1)}
    hists = {"a": hists_run(), "b": hists_run()}
    names = [p.name for p in F.DEFAULT_PANELS]
    assert len(names) == len(set(names))
    for spec in F.DEFAULT_PANELS:
        assert spec.kind in F.PANEL_BUILDERS
        fig = F.build_panel(spec, runs, hists, F.PanelOptions(smoothing=0.5))
        assert isinstance(fig, go.Figure)
        assert len(fig.data) > 0, spec.name
        assert "no data yet" not in annotation_texts(fig), spec.name
        assert fig.layout.uirevision


def test_every_default_panel_has_an_empty_state():
    for spec in F.DEFAULT_PANELS:
        fig = F.build_panel(spec, {"a": scalars([])}, {}, F.PanelOptions(tracked=False))
        assert "not tracked" in annotation_texts(fig), spec.name


def validated(fig):
    """The figure through Plotly's validating constructor (raises on an invalid property).

    The builders skip Plotly's per-property validation for speed (figures._figure); these
    tests are where their output is validated.
    """
    return go.Figure(fig.to_plotly_json() if isinstance(fig, go.Figure) else fig)


@pytest.mark.parametrize("x", ["step", "wall_time"])
def test_every_builder_output_passes_plotly_validation(x):
    runs = {"a": full_run(), "b": full_run(seed=1)}
    hists = {"a": hists_run(), "b": hists_run()}
    empty = {"a": scalars([])}
    for spec in F.DEFAULT_PANELS:
        for opts in (
            F.PanelOptions(smoothing=0.5, x=x),
            F.PanelOptions(smoothing=0.0, x=x, y_log=True, run="b"),
            F.PanelOptions(tracked=False, x=x),
        ):
            validated(F.build_panel(spec, runs, hists, opts))
            validated(F.build_panel(spec, empty, {}, opts))
    rng = np.random.default_rng(0)
    e, joint = np.linspace(-1, 1, 11), rng.random((10, 10))
    for fig in (
        F.empty_figure("no data yet", "t"),
        F.alpha_gauge(rng.normal(size=50)),
        F.alpha_gauge([]),
        F.gradient_tests_figure(1.0, 0.5, 2.0),
        F.gradient_tests_figure(None, None, None),
        F.hist_1d_figure(rng.random(10), e, log_y=True),
        F.hist_2d_figure(joint, e, e, log_color=False),
        F.hist_over_time_figure([0, 1], [rng.random(10)] * 2, e),
        F.hist_over_time_figure([], [], None),
        F.layer_grid_figure({"w": (joint, e, e), "b": (np.zeros((10, 10)), e, e)}),
        F.layer_grid_figure({}),
    ):
        validated(fig)
    assert F.warm_up() == 9


def test_build_panel_plain_line_needs_no_figure_code():
    df = scalars([(s, "my_new_snr", "snr", "all", float(s)) for s in range(5)])
    spec = {
        "name": "snr",
        "kind": "line",
        "instrument": "my_new_snr",
        "metric": "snr",
        "title": "SNR",
        "group": "gradients",
        "y_log": True,
    }
    fig = F.build_panel(spec, {"a": df})
    assert list(fig.data[0].y) == [0, 1, 2, 3, 4]
    assert fig.layout.yaxis.type == "log" and fig.layout.title.text == "SNR"
    linear = F.build_panel(spec, {"a": df}, options=F.PanelOptions(y_log=False))
    assert linear.layout.yaxis.type == "linear"
    with pytest.raises(ValueError, match="unknown panel kind"):
        F.build_panel({**spec, "kind": "radar"}, {"a": df})


def test_model_wide_histogram_panel_sums_layers_when_all_is_missing():
    h = hists_run(steps=(0, 10))
    per_layer = h[(h["instrument"] == "grad_hist_2d") & (h["param"] != "all")]
    spec = next(p for p in F.DEFAULT_PANELS if p.kind == "hist2d")
    fig = F.build_panel(spec, {}, {"a": per_layer})
    latest = per_layer[per_layer["step"] == 10]["counts"]
    np.testing.assert_array_equal(np.array(fig.data[0].customdata), np.sum(list(latest), axis=0))
    assert "(step 10)" in fig.layout.title.text
    with_all = F.build_panel(spec, {}, {"a": h})
    logged = h[(h["instrument"] == "grad_hist_2d") & (h["param"] == "all")]["counts"].iloc[-1]
    np.testing.assert_array_equal(np.array(with_all.data[0].customdata), logged)


def test_single_run_panels_follow_the_selected_run():
    runs = {"a": full_run(seed=0), "b": full_run(seed=5)}
    spec = next(p for p in F.DEFAULT_PANELS if p.kind == "alpha")
    fig = F.build_panel(spec, runs, options=F.PanelOptions(run="b"))
    _, alphas = T.tail_values(runs["b"], "alpha")
    assert fig.data[3].x[0] == pytest.approx(np.clip(alphas.mean(), -1.5, 1.5))
    assert fig.layout.title.text.endswith("b")


def test_figure_csv_lists_what_is_shown():
    fig = F.line_figure({"a": loss_run(n=4)}, "loss")
    table = pd.read_csv(io.StringIO(F.figure_csv(fig)))
    assert list(table.columns) == ["trace", "x", "y", "z"]
    assert table["x"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(table["y"], fig.data[0].y)
    heat = F.hist_over_time_figure(
        [0, 1], [np.ones(2), np.ones(2)], [0.0, 1.0, 2.0], log_color=False
    )
    cells = pd.read_csv(io.StringIO(F.figure_csv(heat)))
    assert len(cells) == 4 and cells["x"].tolist() == [0.5, 1.5, 0.5, 1.5]
    # a figure dict (e.g. from the browser or fig.to_dict(), with base64 typed arrays) works too
    assert F.figure_csv(fig.to_dict()) == F.figure_csv(fig)
    assert F.figure_csv(json.loads(fig.to_json())) == F.figure_csv(fig)


def test_layer_grid_with_many_layers_builds():
    import numpy as np

    from app.figures import layer_grid_figure

    e0, e1 = np.linspace(-1, 1, 5), np.linspace(-2, 2, 6)
    hists = {f"layer{i}.weight": (np.ones((4, 5)), e0, e1) for i in range(18)}
    fig = layer_grid_figure(hists)  # 18 panels, 5 rows: the bottom edge must not go below 0
    assert len(fig.data) >= 18
    fig.to_json()
