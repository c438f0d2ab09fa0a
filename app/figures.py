"""Pure Plotly figure builders for the dashboard, plus extendData payloads for live updates.

No Dash here: every builder takes DataFrames in the log schema (see :mod:`app.transforms`) and
returns a :class:`plotly.graph_objects.Figure`, so the figures are unit-testable and reusable in a
notebook. The Dash layer (layout and callbacks) calls these.

Conventions the Dash layer relies on:

* **Runs and colours.** Multi-run builders take ``runs: {run name: scalars DataFrame}`` (a single
  DataFrame is accepted as ``{"run": df}``). :func:`run_colors` maps run names to colours; pass
  the same mapping (computed once from all runs) as ``colors=`` to every builder so a run keeps
  its colour across panels. Without it, each builder calls :func:`run_colors` on its own runs.
* **Live growth.** Line-type figures (:func:`line_figure`, :func:`tests_history_figure`,
  :func:`batch_size_figure`, :func:`hyperparameter_figure`, :func:`performance_figure`) store a
  JSON-serializable description of their traces in ``fig.layout.meta`` (the *state*). Keep it
  (e.g. in a ``dcc.Store``) and call :func:`extend_lines` with only the new rows of each run; it
  returns ``(payload, new_state)``. ``payload`` is ``None`` (nothing to send) or the
  ``(update, trace_indices, max_points)`` triple for ``dcc.Graph.extendData``. When
  ``new_state["redraw"]`` is true, the figure can't grow in place (a new run or series appeared,
  the figure was empty, or a trace would exceed its point budget): rebuild it with the builder
  from all rows. :func:`hist_over_time_figure` / :func:`extend_hist_over_time` work the same way.
* **Zoom.** Every figure sets ``layout.uirevision`` from what the panel shows (instrument,
  metric, x axis, y scale), never from the data, so user zoom survives refreshes and is reset
  only when the view itself changes.
* **Empty states.** Builders never fail on missing data; they return a figure with one centred
  annotation: ``"not tracked"`` when ``tracked=False`` or ``"no data yet"``.
"""

from __future__ import annotations

import base64
import copy
import io
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from numpy.typing import ArrayLike

from app.transforms import (
    HistRecord,
    XAxis,
    as_counts,
    bin_centers,
    central_mass,
    downsample_minmax,
    edge_mass,
    ema_with_state,
    hist_history,
    latest_hist,
    latest_hists_by_param,
    latest_value,
    metrics_of,
    natural_key,
    params_of,
    series,
    tail_values,
)

__all__ = [
    "COLOR_DIGITS",
    "DEFAULT_MAX_POINTS",
    "PALETTE",
    "TEST_THRESHOLDS",
    "PanelSpec",
    "PanelOptions",
    "PANEL_BUILDERS",
    "DEFAULT_PANELS",
    "ExtendData",
    "run_colors",
    "empty_figure",
    "line_figure",
    "tests_history_figure",
    "batch_size_figure",
    "hyperparameter_figure",
    "performance_figure",
    "extend_lines",
    "alpha_gauge",
    "gradient_tests_figure",
    "hist_1d_figure",
    "hist_2d_figure",
    "hist_over_time_figure",
    "extend_hist_over_time",
    "layer_grid_figure",
    "build_panel",
    "figure_csv",
    "round_significant",
    "warm_up",
]

#: Per-trace point budget of line figures (after min/max downsampling).
DEFAULT_MAX_POINTS = 4000
#: Run colours (Tableau 10).
PALETTE = (
    "#1F77B4",
    "#FF7F0E",
    "#2CA02C",
    "#D62728",
    "#9467BD",
    "#8C564B",
    "#E377C2",
    "#7F7F7F",
    "#BCBD22",
    "#17BECF",
)
#: Cockpit's reference thresholds of the gradient tests (MATH.md): 0.9, 0.9 and tan 80°.
TEST_THRESHOLDS: Mapping[str, float] = {
    "norm_test": 0.9,
    "inner_test": 0.9,
    "ortho_test": math.tan(math.radians(80.0)),
}
_TEST_COLORS = {"norm_test": "#1F77B4", "inner_test": "#2CA02C", "ortho_test": "#FF7F0E"}
_TESTS = ("norm_test", "inner_test", "ortho_test")
_HP_ORDER = ("lr", "momentum", "beta1", "beta2", "weight_decay", "batch_size")
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_RAW_OPACITY = 0.25
_GRID = "#E5ECF6"
_AXIS = dict(gridcolor=_GRID, zerolinecolor=_GRID, linecolor="#C8D4E3", automargin=True)
# A light template: Plotly's built-in ones cost ~25 ms per figure to validate.
_TEMPLATE: Mapping[str, Any] = {
    "layout": {
        "colorway": list(PALETTE),
        "font": {"size": 12, "color": "#2A3F5F"},
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "xaxis": _AXIS,
        "yaxis": _AXIS,
    }
}

#: ``(update, trace_indices, max_points)`` for ``dcc.Graph.extendData``.
ExtendData = tuple[dict[str, list], list[int], int]
Runs = Mapping[str, pd.DataFrame]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def run_colors(names: Iterable[str]) -> dict[str, str]:
    """Stable colour per run name.

    Each name prefers the palette slot given by a hash of the name (so a run keeps its colour
    when other runs come and go); collisions are resolved by probing, in sorted name order, so
    up to ``len(PALETTE)`` runs get distinct colours.

    Args:
        names: Run names.

    Returns:
        ``{name: "#RRGGBB"}``.

    Example:
        >>> from app.figures import run_colors
        >>> run_colors(["sgd", "adam"])
        {'adam': '#FF7F0E', 'sgd': '#1F77B4'}
        >>> run_colors(["sgd", "adam", "rmsprop"])  # a new run keeps the others' colours
        {'adam': '#FF7F0E', 'rmsprop': '#17BECF', 'sgd': '#1F77B4'}

    """
    colors: dict[str, str] = {}
    used: set[int] = set()
    for name in sorted(set(names), key=natural_key):
        slot = zlib.crc32(name.encode("utf-8")) % len(PALETTE)
        if len(used) < len(PALETTE):
            while slot in used:
                slot = (slot + 1) % len(PALETTE)
        used.add(slot)
        colors[name] = PALETTE[slot]
    return colors


def _as_runs(runs: Runs | pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    if runs is None:
        return {}
    if isinstance(runs, pd.DataFrame):
        return {"run": runs}
    return dict(runs)


def _colors(runs: Mapping[str, Any], colors: Mapping[str, str] | None) -> dict[str, str]:
    fallback = run_colors(runs)
    if colors is None:
        return fallback
    return {name: colors.get(name, fallback[name]) for name in runs}


def _empty_text(tracked: bool) -> str:
    return "no data yet" if tracked else "not tracked"


def _base_layout(title: str | None, uirevision: str) -> dict[str, Any]:
    layout: dict[str, Any] = dict(
        template=_TEMPLATE,
        uirevision=uirevision,
        margin=dict(l=55, r=20, t=50 if title else 30, b=40),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0.0),
    )
    if title:
        layout["title"] = dict(text=title, x=0.01, xanchor="left", font=dict(size=14))
    return layout


def _figure(data: Sequence[Mapping[str, Any]], layout: Mapping[str, Any]) -> go.Figure:
    """The figure of plain trace and layout dicts, without Plotly's per-property validation.

    Validating every property of every trace and of the layout was ~40 % of building the
    dashboard's figures (~0.1 s of each full page build); the output of every builder is
    validated by the tests instead (``tests/app/test_figures.py`` rebuilds each figure, and
    each figure of a full dashboard build, with Plotly's validating constructor).
    """
    try:
        return go.Figure(data=list(data), layout=dict(layout), _validate=False)
    except (TypeError, ValueError):  # a Plotly without this (private) switch: validate
        return go.Figure(data=list(data), layout=dict(layout))


def _empty_annotation(text: str) -> dict[str, Any]:
    return dict(
        text=text,
        name="empty",
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        showarrow=False,
        font=dict(size=16, color="#888888"),
    )


def empty_figure(text: str = "no data yet", title: str | None = None) -> go.Figure:
    """A blank figure carrying one centred message (the empty state of every builder).

    Args:
        text: The message, e.g. ``"not tracked"`` or ``"no data yet"``.
        title: Optional title.

    Returns:
        The figure, axes hidden.

    Example:
        >>> from app.figures import empty_figure
        >>> fig = empty_figure("not tracked", title="Hessian trace")
        >>> [a.text for a in fig.layout.annotations], len(fig.data)
        (['not tracked'], 0)

    """
    layout = _base_layout(title, uirevision=f"empty|{title}")
    layout.update(
        annotations=[_empty_annotation(text)],
        xaxis=dict(visible=False),
        yaxis=dict(visible=False),
    )
    return _figure([], layout)


def _json_list(values: ArrayLike) -> list:
    """Floats for JSON: NaN and ±inf become ``None`` (Plotly draws a gap)."""
    arr = np.asarray(values, dtype=np.float64)
    out = arr.astype(object)
    out[~np.isfinite(arr)] = None
    return out.tolist()


def _x_plot(xs: np.ndarray, x: XAxis) -> np.ndarray:
    """Wall time goes to a Plotly date axis, which reads numbers as milliseconds since epoch."""
    return xs * 1000.0 if x == "wall_time" else xs


def _fit_budget(xs: np.ndarray, ys: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Downsample to half the budget when over it, leaving headroom for live extension."""
    if xs.size <= max_points:
        return xs, ys
    return downsample_minmax(xs, ys, max(4, max_points // 2))


# --------------------------------------------------------------------------------------------
# Line-type figures
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Line:
    """One series to draw per run."""

    instrument: str
    metric: str
    param: str = "all"
    label: str = ""
    row: int = 1
    secondary_y: bool = False
    dash: str = "solid"
    smooth: bool = True


def _axis_name(kind: str, row: int) -> str:
    return kind if row == 1 else f"{kind}{row}"


def _lines_figure(
    runs: Runs | pd.DataFrame | None,
    lines_for: Callable[[str, pd.DataFrame | None], list[_Line]],
    *,
    view: str,
    smoothing: float,
    log_y: bool,
    x: XAxis,
    max_points: int,
    colors: Mapping[str, str] | None,
    title: str | None,
    tracked: bool,
    row_titles: Sequence[str] = (),
    y_titles: Sequence[str] = (),
    secondary_title: str | None = None,
    hlines: Sequence[tuple[int, float, str]] = (),
    watch: Sequence[tuple[str, str | None, str | None]] = (),
) -> go.Figure:
    """Shared engine of all line-type figures (see the module docstring for the state).

    Rows are stacked subplots sharing the x axis (row 1 on top, axes ``x``/``y``, ``x2``/``y2``,
    …); a secondary y axis (``y2``, right side) is only supported with one row. The layout is
    written directly: ``make_subplots`` and Plotly's templates cost more than the data.
    """
    runs = _as_runs(runs)
    palette = _colors(runs, colors)
    n_rows = max(1, len(row_titles))
    if secondary_title is not None and n_rows > 1:
        raise ValueError("a secondary y axis needs a single row")
    traces: list[dict[str, Any]] = []
    meta_traces: list[dict[str, Any]] = []
    legend_seen: set[tuple[str, str]] = set()
    n_points = 0

    def add(run: str, line: _Line, role: str, xs: np.ndarray, ys: np.ndarray, state: Any) -> None:
        nonlocal n_points
        shown_x, shown_y = _fit_budget(xs, ys, max_points)
        n_points += shown_x.size
        name = f"{run} · {line.label}" if line.label else run
        showlegend = role != "raw" and (run, line.label) not in legend_seen
        if showlegend:
            legend_seen.add((run, line.label))
        traces.append(
            dict(
                type="scatter",
                x=_x_plot(shown_x, x),
                y=shown_y,
                xaxis=_axis_name("x", line.row),
                yaxis="y2" if line.secondary_y else _axis_name("y", line.row),
                mode="lines+markers" if 0 < xs.size < 50 and role != "raw" else "lines",
                marker=dict(size=4),
                line=dict(color=palette[run], dash=line.dash, width=1.0 if role == "raw" else 2.0),
                opacity=_RAW_OPACITY if role == "raw" else 1.0,
                name=name,
                legendgroup=run,
                showlegend=showlegend,
                hovertemplate=f"{name}<br>%{{x}}: %{{y:.4g}}<extra></extra>",
            )
        )
        meta_traces.append(
            {
                "run": run,
                "instrument": line.instrument,
                "metric": line.metric,
                "param": line.param,
                "role": role,
                "n": int(shown_x.size),
                "last_x": float(xs[-1]) if xs.size else None,
                "ema": state,
            }
        )

    for run, df in runs.items():
        lines = lines_for(run, df)
        extracted: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
        for line in lines:
            key = (line.instrument, line.metric, line.param)
            if key not in extracted:  # e.g. the actual batch size, drawn in every row
                extracted[key] = series(df, *key, x)
            xs, ys = extracted[key]
            if smoothing > 0.0 and line.smooth:
                smoothed, state = ema_with_state(ys, smoothing)
                add(run, line, "raw", xs, ys, None)
                add(run, line, "smooth", xs, smoothed, state)
            else:
                add(run, line, "line", xs, ys, None)

    empty = n_points == 0
    layout = _base_layout(title, uirevision=f"{view}|{x}|{'log' if log_y else 'linear'}")
    annotations: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    gap = 0.07 if n_rows > 1 else 0.0
    height = (1.0 - gap * (n_rows - 1)) / n_rows
    for r in range(1, n_rows + 1):
        top = 1.0 - (r - 1) * (height + gap)
        xa, ya = _axis_name("x", r), _axis_name("y", r)
        layout[_axis_name("xaxis", r)] = dict(
            anchor=ya,
            domain=[0.0, 1.0],
            matches=None if r == 1 else "x",
            showticklabels=r == n_rows,
            type="date" if x == "wall_time" else "linear",
            title=dict(text=("wall time" if x == "wall_time" else "step") if r == n_rows else None),
        )
        layout[_axis_name("yaxis", r)] = dict(
            anchor=xa,
            domain=[max(0.0, top - height), top],
            type="log" if log_y else "linear",
            title=dict(text=y_titles[r - 1] if r - 1 < len(y_titles) else None),
        )
        if n_rows > 1 and r - 1 < len(row_titles):
            annotations.append(
                dict(
                    text=row_titles[r - 1],
                    name="row_title",
                    xref="paper",
                    yref="paper",
                    x=0.5,
                    y=top,
                    xanchor="center",
                    yanchor="bottom",
                    showarrow=False,
                    font=dict(size=12),
                )
            )
    if secondary_title is not None:
        layout["yaxis2"] = dict(
            overlaying="y",
            side="right",
            anchor="x",
            showgrid=False,
            title=dict(text=secondary_title),
        )
    for row, y, text in hlines:
        shapes.append(
            dict(
                type="line",
                name="threshold",
                xref=f"{_axis_name('x', row)} domain",
                yref=_axis_name("y", row),
                x0=0.0,
                x1=1.0,
                y0=y,
                y1=y,
                line=dict(color="#888888", dash="dash", width=1),
            )
        )
        annotations.append(
            dict(
                text=text,
                name="threshold",
                xref=f"{_axis_name('x', row)} domain",
                yref=_axis_name("y", row),
                x=0.0,
                y=y,
                xanchor="left",
                yanchor="bottom",
                showarrow=False,
                font=dict(size=10, color="#888888"),
            )
        )
    if empty:
        annotations.append(_empty_annotation(_empty_text(tracked)))
    layout.update(
        annotations=annotations,
        shapes=shapes,
        meta={
            "builder": "lines",
            "view": view,
            "x": x,
            "smoothing": float(smoothing),
            "max_points": int(max_points),
            "runs": list(runs),
            "traces": meta_traces,
            "watch": [list(w) for w in watch],
            "empty": empty,
            "redraw": False,
        },
    )
    return _figure(traces, layout)


def line_figure(
    runs: Runs | pd.DataFrame | None,
    instrument: str,
    metric: str | None = None,
    param: str = "all",
    smoothing: float = 0.0,
    log_y: bool = False,
    x: XAxis = "step",
    max_points: int = DEFAULT_MAX_POINTS,
    *,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
    tracked: bool = True,
) -> go.Figure:
    """One scalar series over steps (or wall time) for every run.

    Traces per run, in run order: with ``smoothing > 0`` a faint raw line (role ``"raw"``) then
    the debiased-EMA line (role ``"smooth"``); with ``smoothing == 0`` one line (role
    ``"line"``). Every run gets its traces even before it has data, so :func:`extend_lines` can
    fill them. Series longer than ``max_points`` are min/max-downsampled to ``max_points // 2``.

    Args:
        runs: ``{run name: scalars}`` or one scalars DataFrame.
        instrument: Instrument name.
        metric: Metric name; defaults to ``instrument``.
        param: Parameter name (``"all"`` for model-wide values).
        smoothing: EMA smoothing in ``[0, 1)``.
        log_y: Logarithmic y axis.
        x: ``"step"`` or ``"wall_time"`` (drawn on a date axis).
        max_points: Per-trace point budget (at least 8).
        title: Figure title.
        colors: ``{run: colour}`` shared across panels (see :func:`run_colors`).
        tracked: Whether the instrument is configured; picks the empty-state text.

    Returns:
        The figure, with the extension state in ``layout.meta``.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"step": range(4), "wall_time": 0.0, "instrument": "loss",
        ...                    "metric": "loss", "param": "all", "value": [1.0, 0.8, 0.5, 0.4]})
        >>> import numpy as np
        >>> from app.figures import line_figure
        >>> fig = line_figure({"sgd": df}, "loss", smoothing=0.5)
        >>> [t["role"] for t in fig.layout.meta["traces"]]  # faint raw line, then the EMA
        ['raw', 'smooth']
        >>> np.round(fig.data[1].y, 3).tolist()
        [1.0, 0.867, 0.657, 0.52]
        >>> line_figure({"sgd": df}, "hess_trace", tracked=False).layout.annotations[0].text
        'not tracked'

    """
    metric = instrument if metric is None else metric
    line = _Line(instrument, metric, param)
    return _lines_figure(
        runs,
        lambda run, df: [line],
        view=f"line|{instrument}|{metric}|{param}",
        smoothing=smoothing,
        log_y=log_y,
        x=x,
        max_points=max_points,
        colors=colors,
        title=title,
        tracked=tracked,
        y_titles=[metric if param == "all" else f"{metric} ({param})"],
    )


def tests_history_figure(
    runs: Runs | pd.DataFrame | None,
    smoothing: float = 0.0,
    log_y: bool = True,
    x: XAxis = "step",
    thresholds: Mapping[str, float] = TEST_THRESHOLDS,
    max_points: int = DEFAULT_MAX_POINTS,
    *,
    title: str | None = "Gradient tests",
    colors: Mapping[str, str] | None = None,
    tracked: bool = True,
) -> go.Figure:
    """The norm, inner-product and orthogonality tests over steps, one row each.

    Each row has a dashed line at the test's reference threshold (above it: too noisy).

    Args:
        runs: ``{run name: scalars}`` or one scalars DataFrame.
        smoothing: EMA smoothing in ``[0, 1)``.
        log_y: Logarithmic y axes.
        x: ``"step"`` or ``"wall_time"``.
        thresholds: Reference thresholds per test name.
        max_points: Per-trace point budget.
        title: Figure title.
        colors: ``{run: colour}``.
        tracked: Whether the tests are configured.

    Returns:
        The figure (line-type: extend with :func:`extend_lines`).

    Example:
        >>> import pandas as pd
        >>> def rows(instrument, values, metric=None, param="all"):  # scalars, log schema
        ...     return pd.DataFrame({"step": range(len(values)), "wall_time": 0.0,
        ...                          "instrument": instrument, "metric": metric or instrument,
        ...                          "param": param, "value": values})
        >>> import numpy as np
        >>> from app.figures import tests_history_figure
        >>> df = pd.concat([rows("norm_test", [1.2, 1.0]), rows("inner_test", [0.5, 0.4]),
        ...                 rows("ortho_test", [2.0, 1.5])])
        >>> fig = tests_history_figure({"sgd": df})
        >>> len(fig.data), np.asarray(fig.data[0].y).tolist()  # one row per test
        (3, [1.2, 1.0])
        >>> sorted(round(s.y0, 2) for s in fig.layout.shapes)  # the dashed reference thresholds
        [0.9, 0.9, 5.67]

    """
    lines = [_Line(t, t, row=i + 1) for i, t in enumerate(_TESTS)]
    return _lines_figure(
        runs,
        lambda run, df: lines,
        view="tests_history",
        smoothing=smoothing,
        log_y=log_y,
        x=x,
        max_points=max_points,
        colors=colors,
        title=title,
        tracked=tracked,
        row_titles=["norm test", "inner-product test", "orthogonality test"],
        hlines=[
            (i + 1, float(thresholds[t]), f"ref {thresholds[t]:.3g}")
            for i, t in enumerate(_TESTS)
            if t in thresholds
        ],
    )


def batch_size_figure(
    runs: Runs | pd.DataFrame | None,
    smoothing: float = 0.0,
    log_y: bool = True,
    x: XAxis = "step",
    max_points: int = DEFAULT_MAX_POINTS,
    *,
    title: str | None = "Suggested batch size",
    colors: Mapping[str, str] | None = None,
    tracked: bool = True,
) -> go.Figure:
    """Batch sizes at which each gradient test would meet its threshold, one row per test.

    Each row also shows the actual batch size (``hyperparameters/batch_size``) dotted, so a
    suggestion above the dotted line means "a larger batch would help".

    Args:
        runs: ``{run name: scalars}`` or one scalars DataFrame.
        smoothing: EMA smoothing of the suggestions in ``[0, 1)``.
        log_y: Logarithmic y axes.
        x: ``"step"`` or ``"wall_time"``.
        max_points: Per-trace point budget.
        title: Figure title.
        colors: ``{run: colour}``.
        tracked: Whether the batch-size suggestions are configured.

    Returns:
        The figure (line-type: extend with :func:`extend_lines`).

    Example:
        >>> import pandas as pd
        >>> def rows(instrument, values, metric=None, param="all"):  # scalars, log schema
        ...     return pd.DataFrame({"step": range(len(values)), "wall_time": 0.0,
        ...                          "instrument": instrument, "metric": metric or instrument,
        ...                          "param": param, "value": values})
        >>> import numpy as np
        >>> from app.figures import batch_size_figure
        >>> df = pd.concat([rows("batch_size", [40.0, 60.0], "norm_test"),
        ...                 rows("hyperparameters", [32.0, 32.0], "batch_size")])
        >>> fig = batch_size_figure({"sgd": df})
        >>> [(t.name, np.asarray(t.y).tolist()) for t in fig.data[:2]]  # above the actual: grow
        [('sgd', [40.0, 60.0]), ('sgd · actual', [32.0, 32.0])]

    """
    lines: list[_Line] = []
    for i, test in enumerate(_TESTS):
        lines.append(_Line("batch_size", test, row=i + 1))
        lines.append(
            _Line(
                "hyperparameters", "batch_size", label="actual", row=i + 1, dash="dot", smooth=False
            )
        )
    return _lines_figure(
        runs,
        lambda run, df: lines,
        view="batch_size",
        smoothing=smoothing,
        log_y=log_y,
        x=x,
        max_points=max_points,
        colors=colors,
        title=title,
        tracked=tracked,
        row_titles=["from norm test", "from inner-product test", "from orthogonality test"],
    )


def hyperparameter_figure(
    runs: Runs | pd.DataFrame | None,
    metrics: Sequence[str] | None = None,
    log_y: bool = False,
    x: XAxis = "step",
    max_points: int = DEFAULT_MAX_POINTS,
    *,
    title: str | None = "Hyperparameters",
    colors: Mapping[str, str] | None = None,
    tracked: bool = True,
) -> go.Figure:
    """Optimizer hyperparameters over steps: one row per metric, one line per param group.

    Rows default to every ``hyperparameters`` metric present (``lr`` first). Groups are told
    apart by dash style and legend label. Never smoothed. A metric or group appearing later
    makes :func:`extend_lines` ask for a redraw.

    Args:
        runs: ``{run name: scalars}`` or one scalars DataFrame.
        metrics: Which hyperparameters to show (e.g. ``["lr"]``); ``None`` shows all present.
        log_y: Logarithmic y axes.
        x: ``"step"`` or ``"wall_time"``.
        max_points: Per-trace point budget.
        title: Figure title.
        colors: ``{run: colour}``.
        tracked: Whether hyperparameters are logged.

    Returns:
        The figure (line-type: extend with :func:`extend_lines`).

    Example:
        >>> import pandas as pd
        >>> def rows(instrument, values, metric=None, param="all"):  # scalars, log schema
        ...     return pd.DataFrame({"step": range(len(values)), "wall_time": 0.0,
        ...                          "instrument": instrument, "metric": metric or instrument,
        ...                          "param": param, "value": values})
        >>> from app.figures import hyperparameter_figure
        >>> df = pd.concat([rows("hyperparameters", [0.1, 0.05], "lr", "group0"),
        ...                 rows("hyperparameters", [0.01, 0.01], "lr", "group1")])
        >>> [t.name for t in hyperparameter_figure({"sgd": df}).data]
        ['sgd · group0', 'sgd · group1']

    """
    runs = _as_runs(runs)
    present = {m for df in runs.values() for m in metrics_of(df, "hyperparameters")}
    watch: list[tuple[str, str | None, str | None]] = [("hyperparameters", None, None)]
    if metrics is not None:
        watch = [("hyperparameters", m, None) for m in metrics]
    else:
        order = {m: i for i, m in enumerate(_HP_ORDER)}
        metrics = sorted(present, key=lambda m: (order.get(m, len(order)), natural_key(m)))
    metrics = list(metrics) or ["lr"]
    row_of = {m: i + 1 for i, m in enumerate(metrics)}

    def lines_for(run: str, df: pd.DataFrame | None) -> list[_Line]:
        out = []
        for m in metrics:
            params = params_of(df, "hyperparameters", m)
            for j, p in enumerate(params):
                label = p if len(params) > 1 or p != "all" else ""
                out.append(
                    _Line(
                        "hyperparameters",
                        m,
                        p,
                        label=label,
                        row=row_of[m],
                        dash=_DASHES[j % len(_DASHES)],
                        smooth=False,
                    )
                )
        return out

    return _lines_figure(
        runs,
        lines_for,
        view=f"hyperparameters|{','.join(metrics)}",
        smoothing=0.0,
        log_y=log_y,
        x=x,
        max_points=max_points,
        colors=colors,
        title=title,
        tracked=tracked,
        row_titles=metrics if len(metrics) > 1 else (),
        y_titles=[] if len(metrics) > 1 else metrics,
        watch=watch,
    )


def performance_figure(
    runs: Runs | pd.DataFrame | None,
    smoothing: float = 0.0,
    log_y: bool = False,
    x: XAxis = "step",
    max_points: int = DEFAULT_MAX_POINTS,
    *,
    title: str | None = "Performance",
    colors: Mapping[str, str] | None = None,
    tracked: bool = True,
) -> go.Figure:
    """Training loss (left axis) and user metrics such as accuracy (right axis).

    User metrics are the ``instrument == "user"``, ``param == "all"`` rows, drawn dashed/dotted
    per metric and smoothed like the loss. A user metric appearing later (e.g. validation
    accuracy logged once per epoch) makes :func:`extend_lines` ask for a redraw.

    Args:
        runs: ``{run name: scalars}`` or one scalars DataFrame.
        smoothing: EMA smoothing in ``[0, 1)``.
        log_y: Logarithmic loss axis (the metric axis stays linear).
        x: ``"step"`` or ``"wall_time"``.
        max_points: Per-trace point budget.
        title: Figure title.
        colors: ``{run: colour}``.
        tracked: Whether the loss is logged.

    Returns:
        The figure (line-type: extend with :func:`extend_lines`).

    Example:
        >>> import pandas as pd
        >>> def rows(instrument, values, metric=None, param="all"):  # scalars, log schema
        ...     return pd.DataFrame({"step": range(len(values)), "wall_time": 0.0,
        ...                          "instrument": instrument, "metric": metric or instrument,
        ...                          "param": param, "value": values})
        >>> from app.figures import performance_figure
        >>> df = pd.concat([rows("loss", [1.0, 0.7]), rows("user", [0.5, 0.6], "accuracy")])
        >>> fig = performance_figure({"sgd": df})
        >>> [(t.name, t.yaxis) for t in fig.data]  # metrics on the right axis
        [('sgd · loss', 'y'), ('sgd · accuracy', 'y2')]

    """
    runs = _as_runs(runs)
    user = sorted({m for df in runs.values() for m in metrics_of(df, "user")}, key=natural_key)
    dash_of = {m: _DASHES[1 + i % (len(_DASHES) - 1)] for i, m in enumerate(user)}

    def lines_for(run: str, df: pd.DataFrame | None) -> list[_Line]:
        out = [_Line("loss", "loss", label="loss")]
        for m in metrics_of(df, "user"):
            if "all" in params_of(df, "user", m):
                out.append(_Line("user", m, label=m, secondary_y=True, dash=dash_of[m]))
        return out

    return _lines_figure(
        runs,
        lines_for,
        view="performance",
        smoothing=smoothing,
        log_y=log_y,
        x=x,
        max_points=max_points,
        colors=colors,
        title=title,
        tracked=tracked,
        y_titles=["loss"],
        secondary_title="metric",
        watch=[("user", None, "all")],
    )


def _redraw(state: Mapping[str, Any]) -> tuple[None, dict[str, Any]]:
    out = copy.deepcopy(dict(state))
    out["redraw"] = True
    return None, out


def _needs_new_traces(
    run: str, df: pd.DataFrame, state: Mapping[str, Any], known: set[tuple[str, str, str, str]]
) -> bool:
    """Whether new rows of ``run`` belong to a series the figure has no trace for."""
    instruments = {t["instrument"] for t in state["traces"]} | {w[0] for w in state["watch"]}
    if run not in state["runs"]:
        return bool(df["instrument"].isin(instruments).any())
    for inst, metric, param in state["watch"]:
        mask = df["instrument"] == inst
        if metric is not None:
            mask &= df["metric"] == metric
        if param is not None:
            mask &= df["param"] == param
        if mask.any():
            keys = df.loc[mask, ["metric", "param"]].drop_duplicates().itertuples(index=False)
            if any((run, inst, str(m), str(p)) not in known for m, p in keys):
                return True
    return False


def extend_lines(
    new_runs: Runs | pd.DataFrame, state: Mapping[str, Any]
) -> tuple[ExtendData | None, dict[str, Any]]:
    """ExtendData payload that appends only the new points to a line-type figure.

    Rows at or before a trace's last shown x are ignored, so passing overlapping rows is safe.
    Smoothed traces continue their EMA from the stored state, so they match a full rebuild.

    Args:
        new_runs: ``{run name: new scalar rows}`` (a DataFrame is taken as run ``"run"``).
        state: The figure's ``layout.meta`` (or the state returned by the previous call).

    Returns:
        ``(payload, new_state)``. ``payload`` is ``None`` when there is nothing to send, else
        ``({"x": [[...], ...], "y": [[...], ...]}, trace_indices, max_points)``. When
        ``new_state["redraw"]`` is true, send nothing and rebuild the figure from all rows.

    Raises:
        ValueError: If ``state`` does not come from a line-type builder.

    Example:
        A live panel sends only the new points (``dcc.Graph.extendData``):

        >>> import pandas as pd
        >>> def rows(instrument, values, metric=None, param="all"):  # scalars, log schema
        ...     return pd.DataFrame({"step": range(len(values)), "wall_time": 0.0,
        ...                          "instrument": instrument, "metric": metric or instrument,
        ...                          "param": param, "value": values})
        >>> from app.figures import extend_lines, line_figure
        >>> fig = line_figure({"sgd": rows("loss", [1.0, 0.8, 0.5])}, "loss")
        >>> state = fig.layout.meta  # keep it, e.g. in a dcc.Store
        >>> new = rows("loss", [0.8, 0.5, 0.4, 0.35])  # overlapping rows are skipped
        >>> payload, state = extend_lines({"sgd": new}, state)
        >>> payload
        ({'x': [[3.0]], 'y': [[0.35]]}, [0], 4000)
        >>> state["redraw"]  # True: a new run or series appeared, rebuild instead
        False

    """
    if state.get("builder") != "lines":
        raise ValueError("state does not come from a line-type figure builder")
    new_runs = _as_runs(new_runs)
    out = copy.deepcopy(dict(state))
    out["redraw"] = False
    x, smoothing, budget = out["x"], out["smoothing"], out["max_points"]
    known = {(t["run"], t["instrument"], t["metric"], t["param"]) for t in out["traces"]}
    for run, df in new_runs.items():
        if df is not None and not df.empty and _needs_new_traces(run, df, out, known):
            return _redraw(state)
    xs_out: list[list] = []
    ys_out: list[list] = []
    indices: list[int] = []
    for i, t in enumerate(out["traces"]):
        xs, ys = series(new_runs.get(t["run"]), t["instrument"], t["metric"], t["param"], x)
        if t["last_x"] is not None:
            keep = xs > t["last_x"]
            xs, ys = xs[keep], ys[keep]
        if xs.size == 0:
            continue
        if out["empty"]:
            return _redraw(state)
        last_x = float(xs[-1])
        if t["role"] == "smooth":
            ys, t["ema"] = ema_with_state(ys, smoothing, t["ema"])
        if xs.size > budget:
            xs, ys = downsample_minmax(xs, ys, budget)
        if t["n"] + xs.size > budget:
            return _redraw(state)
        t["n"] += int(xs.size)
        t["last_x"] = last_x
        xs_out.append(_json_list(_x_plot(xs, x)))
        ys_out.append(_json_list(ys))
        indices.append(i)
    if not indices:
        return None, out
    return ({"x": xs_out, "y": ys_out}, indices, int(budget)), out


# --------------------------------------------------------------------------------------------
# Cockpit gauges
# --------------------------------------------------------------------------------------------
def _note(text: str, name: str, x: float, y: float, xanchor: str = "center") -> dict[str, Any]:
    """A text annotation in paper coordinates."""
    return dict(
        text=text,
        name=name,
        xref="paper",
        yref="paper",
        x=x,
        y=y,
        xanchor=xanchor,
        showarrow=False,
    )


def _rule(color: str, **where: Any) -> dict[str, Any]:
    """A thin line shape below the data."""
    return dict(type="line", line=dict(color=color, width=1), layer="below", **where)


def alpha_gauge(
    alpha_values: ArrayLike,
    recent_fraction: float = 0.1,
    bins: int = 30,
    *,
    title: str | None = "Alpha (normalized step length)",
    tracked: bool = True,
) -> go.Figure:
    """Cockpit's alpha panel: where on the local parabola the optimizer steps to.

    Draws the unit parabola ``y = x²`` on ``[−1.5, 1.5]`` (left axis, "standardized loss") with
    zone lines at α = −1, 0, 1 and on the right axis the α density over all steps (grey) and over
    the most recent ``recent_fraction`` of steps (coloured), plus markers on the parabola at
    both means. α ≈ 0 steps to the minimum; ≈ +1 to the same height on the far side (learning
    rate too large); ≈ −1 barely moves (too small). Values outside the range are counted in
    corner annotations (names ``outliers_low``/``outliers_high``); the means are annotated too
    (``means``). Traces: 0 parabola, 1 all-steps density, 2 recent density, 3 mean markers.

    Args:
        alpha_values: α per tracked step, in step order (NaNs are dropped).
        recent_fraction: Share of the latest values shown as "recent" (at least one value).
        bins: Histogram bins on ``[−1.5, 1.5]``; densities are relative to all values, so
            out-of-range values shrink the bars.
        title: Figure title.
        tracked: Whether alpha is configured (empty-state text).

    Returns:
        The figure.

    Example:
        >>> from app.figures import alpha_gauge
        >>> fig = alpha_gauge([0.9, 1.1, 1.0, 0.95, 1.2, 2.0])  # α per tracked step
        >>> [t.name for t in fig.data]
        ['local parabola', 'all steps (μ=1.19)', 'last 10% (μ=2.00)', 'mean α']
        >>> [a.text for a in fig.layout.annotations if a.name == "outliers_high"]
        ['1 above 1.5 ▶']
    """
    lo, hi = -1.5, 1.5
    a = np.asarray(alpha_values, dtype=np.float64).reshape(-1)
    a = a[np.isfinite(a)]
    px = np.linspace(lo, hi, 121)
    traces: list[dict[str, Any]] = [
        dict(
            type="scatter",
            x=px,
            y=px**2,
            mode="lines",
            name="local parabola",
            line=dict(color="#555555", width=2),
            hoverinfo="skip",
        )
    ]
    shapes = [_rule("#BBBBBB", xref="x", yref="paper", x0=v, x1=v, y0=0, y1=1) for v in (-1, 0, 1)]
    shapes.append(_rule("#DDDDDD", xref="paper", yref="y", x0=0, x1=1, y0=1, y1=1))
    layout = _base_layout(title, uirevision="alpha")
    layout.update(
        xaxis=dict(range=[lo, hi], title=dict(text="local step length α"), zeroline=False),
        yaxis=dict(range=[0, 1.75], title=dict(text="standardized loss")),
        yaxis2=dict(
            overlaying="y",
            side="right",
            title=dict(text="α density"),
            showgrid=False,
            rangemode="tozero",
        ),
        barmode="overlay",
        shapes=shapes,
        annotations=[],
    )
    if a.size == 0:
        layout["annotations"] = [_empty_annotation(_empty_text(tracked))]
        return _figure(traces, layout)
    recent = a[-max(1, math.ceil(recent_fraction * a.size)) :]
    edges = np.linspace(lo, hi, bins + 1)
    width = float(edges[1] - edges[0])
    pct = f"{recent_fraction:.0%}"
    mean_all, mean_recent = float(a.mean()), float(recent.mean())
    for label, vals, mean, color, opacity in (
        ("all steps", a, mean_all, "#999999", 0.5),
        (f"last {pct}", recent, mean_recent, PALETTE[0], 0.75),
    ):
        counts, _ = np.histogram(vals, bins=edges)
        traces.append(
            dict(
                type="bar",
                x=bin_centers(edges),
                y=counts / (vals.size * width),
                width=width,
                yaxis="y2",
                marker=dict(color=color, line=dict(width=0)),
                opacity=opacity,
                name=f"{label} (μ={mean:.2f})",
                hovertemplate="α≈%{x:.2f}: %{y:.3g}<extra></extra>",
            )
        )
    mx = np.clip([mean_all, mean_recent], lo, hi)
    traces.append(
        dict(
            type="scatter",
            x=mx,
            y=mx**2,
            mode="markers",
            name="mean α",
            marker=dict(color=["#999999", PALETTE[0]], size=12, line=dict(color="white", width=1)),
            text=["mean (all)", f"mean (last {pct})"],
            hovertemplate="%{text}: α=%{x:.2f}<extra></extra>",
        )
    )
    summary = f"mean α: all {mean_all:.2f} · last {pct} {mean_recent:.2f}"
    notes = [_note(summary, "means", 0.5, 0.98)]
    below, above = int((a < lo).sum()), int((a > hi).sum())
    if below:
        notes.append(_note(f"◀ {below} below {lo}", "outliers_low", 0.0, 0.88, "left"))
    if above:
        notes.append(_note(f"{above} above {hi} ▶", "outliers_high", 1.0, 0.88, "right"))
    layout["annotations"] = notes
    return _figure(traces, layout)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def gradient_tests_figure(
    norm: float | None,
    inner: float | None,
    ortho: float | None,
    thresholds: Mapping[str, float] = TEST_THRESHOLDS,
    *,
    title: str | None = "Gradient tests",
    tracked: bool = True,
) -> go.Figure:
    """Cockpit's gradient-tests gauge for the latest tracked step.

    The plane is centred on the mini-batch gradient: the vertical axis points along the
    gradient, the horizontal axis perpendicular to it. The shaded disc has radius = norm test,
    the horizontal band half-width = inner-product test (spread along the gradient), the
    vertical band half-width = orthogonality test (spread perpendicular to it). Dashed lines
    mark the reference thresholds (circle for the norm test, lines for the others); shading
    beyond them means noisy gradients. Axes are linear with equal aspect, so the disc stays
    round; the range covers every value and the norm/inner thresholds, and the ortho threshold
    (tan 80° ≈ 5.67) becomes visible once the ortho value approaches it. Legend names carry the
    values and a ✓/✗ against the reference.

    Args:
        norm: Norm-test value (``None``/NaN: not shown).
        inner: Inner-product-test value.
        ortho: Orthogonality-test value.
        thresholds: Reference thresholds per test name.
        title: Figure title.
        tracked: Whether the tests are configured (empty-state text).

    Returns:
        The figure; trace names start with ``"norm test"``, ``"inner test"``, ``"ortho test"``
        (shaded, ``fill="toself"``) or ``"norm threshold"``, ``"inner threshold"``,
        ``"ortho threshold"`` (dashed).

    Example:
        >>> from app.figures import gradient_tests_figure
        >>> fig = gradient_tests_figure(norm=1.2, inner=0.5, ortho=2.0)
        >>> [t.name for t in fig.data if "test" in t.name]  # ✗: beyond the reference
        ['inner test 0.5 (ref 0.9) ✓', 'ortho test 2 (ref 5.67) ✓', 'norm test 1.2 (ref 0.9) ✗']
    """
    values = {"norm_test": norm, "inner_test": inner, "ortho_test": ortho}
    present = {k: float(v) for k, v in values.items() if _finite(v)}
    if not present:
        return empty_figure(_empty_text(tracked), title)
    scale = list(present.values())  # the ortho threshold would squash everything: not here
    for key in ("norm_test", "inner_test"):
        if key in present and key in thresholds:
            scale.append(thresholds[key])
    r = 1.15 * max(max(scale), 1e-3)
    theta = np.linspace(0.0, 2.0 * math.pi, 181)
    circle = np.cos(theta), np.sin(theta)
    traces: list[dict[str, Any]] = []

    def label(key: str, text: str) -> str:
        ref = thresholds.get(key)
        if ref is None:
            return f"{text} {present[key]:.3g}"
        return f"{text} {present[key]:.3g} (ref {ref:.3g}) {'✓' if present[key] <= ref else '✗'}"

    def shade(key: str, text: str, xs: ArrayLike, ys: ArrayLike) -> None:
        color = _TEST_COLORS[key]
        traces.append(
            dict(
                type="scatter",
                x=xs,
                y=ys,
                fill="toself",
                mode="lines",
                name=label(key, text),
                line=dict(color=color, width=1.5),
                fillcolor=color,
                opacity=0.45,
                hoverinfo="name",
            )
        )

    def reference(key: str, text: str, xs: ArrayLike, ys: ArrayLike) -> None:
        traces.append(
            dict(
                type="scatter",
                x=xs,
                y=ys,
                mode="lines",
                name=f"{text} threshold",
                line=dict(color=_TEST_COLORS[key], dash="dash", width=1.5),
                hoverinfo="name",
            )
        )

    if "inner_test" in present:
        w = present["inner_test"]
        shade("inner_test", "inner test", [-r, r, r, -r, -r], [-w, -w, w, w, -w])
    if "ortho_test" in present:
        w = present["ortho_test"]
        shade("ortho_test", "ortho test", [-w, w, w, -w, -w], [-r, -r, r, r, -r])
    if "norm_test" in present:
        n = present["norm_test"]
        shade("norm_test", "norm test", n * circle[0], n * circle[1])
    if "norm_test" in present and "norm_test" in thresholds:
        t = thresholds["norm_test"]
        reference("norm_test", "norm", t * circle[0], t * circle[1])
    if "inner_test" in present and "inner_test" in thresholds:
        t = thresholds["inner_test"]
        reference("inner_test", "inner", [-r, r, None, -r, r], [-t, -t, None, t, t])
    if "ortho_test" in present and "ortho_test" in thresholds:
        t = thresholds["ortho_test"]
        reference("ortho_test", "ortho", [-t, -t, None, t, t], [-r, r, None, -r, r])
    traces.append(
        dict(
            type="scatter",
            x=[0.0],
            y=[0.0],
            mode="markers",
            name="gradient",
            showlegend=False,
            marker=dict(symbol="cross-thin", size=16, line=dict(width=3, color="black")),
            hoverinfo="name",
        )
    )
    layout = _base_layout(title, uirevision="gradient_tests")
    layout.update(
        xaxis=dict(range=[-r, r], title=dict(text="⊥ gradient (ortho)"), zeroline=False),
        yaxis=dict(
            range=[-r, r],
            title=dict(text="∥ gradient (inner)"),
            zeroline=False,
            scaleanchor="x",
            scaleratio=1.0,
        ),
        legend=dict(orientation="v", x=1.02, xanchor="left", y=1.0, yanchor="top"),
    )
    return _figure(traces, layout)


# --------------------------------------------------------------------------------------------
# Histograms
# --------------------------------------------------------------------------------------------
def hist_1d_figure(
    counts: ArrayLike | None,
    edges: ArrayLike | None,
    log_y: bool = False,
    *,
    title: str | None = "Gradient histogram",
    tracked: bool = True,
) -> go.Figure:
    """Histogram of individual-gradient entries, edge bins highlighted.

    Values outside the range are clamped into the two edge bins, so they get their own trace
    (trace 1, red) and an annotation (``edge_mass``) with their share of the mass; trace 0 holds
    the inner bins.

    Args:
        counts: ``[B]`` counts.
        edges: ``B + 1`` gradient-bin edges.
        log_y: Logarithmic count axis.
        title: Figure title.
        tracked: Whether the histogram is configured (empty-state text).

    Returns:
        The figure.

    Example:
        >>> import numpy as np
        >>> from app.figures import hist_1d_figure
        >>> counts, edges = np.array([10.0, 1, 2, 1, 20]), np.linspace(-1, 1, 6)  # [B], [B + 1]
        >>> fig = hist_1d_figure(counts, edges)
        >>> [t.name for t in fig.data], fig.layout.annotations[0].text
        (['gradient entries', 'edge bins (incl. clamped)'], 'edge bins: 88.2% of mass')
    """
    c = None if counts is None else as_counts(counts).reshape(-1)
    if c is None or edges is None or c.size == 0 or c.sum() <= 0:
        return empty_figure(_empty_text(tracked), title)
    e = np.asarray(edges, dtype=np.float64).reshape(-1)
    centers, widths = bin_centers(e), np.diff(e)
    is_edge = np.zeros(c.size, dtype=bool)
    is_edge[[0, -1]] = True
    traces = [
        dict(
            type="bar",
            x=centers[mask],
            y=c[mask],
            width=widths[mask],
            name=name,
            marker=dict(color=color, line=dict(width=0)),
            hovertemplate="g≈%{x:.3g}: %{y:.4g}<extra></extra>",
        )
        for mask, name, color in (
            (~is_edge, "gradient entries", PALETTE[0]),
            (is_edge, "edge bins (incl. clamped)", "#D62728"),
        )
    ]
    layout = _base_layout(title, uirevision=f"hist1d|{'log' if log_y else 'linear'}")
    layout.update(
        bargap=0.0,
        showlegend=False,
        xaxis=dict(title=dict(text="individual gradient entry"), range=[e[0], e[-1]]),
        yaxis=dict(title=dict(text="count"), type="log" if log_y else "linear"),
        annotations=[_note(f"edge bins: {edge_mass(c):.1%} of mass", "edge_mass", 1, 1, "right")],
    )
    return _figure(traces, layout)


#: Significant digits of heatmap colour values (``z``); the hover shows three.
COLOR_DIGITS = 4


def round_significant(values: ArrayLike, digits: int = COLOR_DIGITS) -> np.ndarray:
    """Round to ``digits`` significant digits (NaN, ±inf and 0 unchanged).

    Heatmap cells only pick a colour, so four digits are plenty, and the JSON sent to the
    browser shrinks from ~19 characters per cell to ~7 (a 10⁵-cell histogram over time:
    2 MB → 0.8 MB, and a quarter of the encoding time).

    Args:
        values: Any float array.
        digits: Significant digits to keep (at least 1).

    Returns:
        A new float64 array of the same shape.

    Example:
        >>> import numpy as np
        >>> from app.figures import round_significant
        >>> round_significant([123456.0, 0.000123456, 0.0, np.nan]).tolist()
        [123500.0, 0.0001235, 0.0, nan]

    """
    out = np.array(values, dtype=np.float64, copy=True)
    nonzero = np.isfinite(out) & (out != 0.0)
    v = out[nonzero]
    if v.size:
        scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(v))))
        out[nonzero] = np.round(v * scale) / scale
    return out


def _color_z(values: np.ndarray, log_color: bool) -> np.ndarray:
    """Colour values: log10 with empty cells blank (NaN), or the values themselves.

    Rounded to :data:`COLOR_DIGITS` significant digits (see :func:`round_significant`).
    """
    if not log_color:
        return round_significant(values)
    positive = values > 0
    return round_significant(np.where(positive, np.log10(np.where(positive, values, 1.0)), np.nan))


def hist_2d_figure(
    counts: ArrayLike | None,
    edges_0: ArrayLike | None,
    edges_1: ArrayLike | None,
    log_color: bool = True,
    *,
    title: str | None = "Gradient × parameter histogram",
    tracked: bool = True,
) -> go.Figure:
    """Joint histogram of (parameter value, individual gradient) with both marginals.

    Layout: heatmap bottom-left (axes ``x``/``y``: x = parameter value, y = gradient value),
    parameter marginal on top (``x``/``y2``, sharing the heatmap's x axis), gradient marginal as
    horizontal bars on the right (``x2``/``y``, sharing its y axis). Traces: 0 heatmap (``z`` =
    log10(count) with empty bins blank when ``log_color``, raw counts in ``customdata``),
    1 parameter marginal, 2 gradient marginal.

    Args:
        counts: ``[B_g, B_p]`` counts (gradient bins × parameter bins).
        edges_0: ``B_g + 1`` gradient-bin edges.
        edges_1: ``B_p + 1`` parameter-bin edges.
        log_color: Logarithmic colour scale.
        title: Figure title.
        tracked: Whether the histogram is configured (empty-state text).

    Returns:
        The figure.

    Example:
        >>> import numpy as np
        >>> from app.figures import hist_2d_figure
        >>> counts = np.ones((4, 3))  # [B_g, B_p]: gradient bins × parameter bins
        >>> fig = hist_2d_figure(counts, np.linspace(-1, 1, 5), np.linspace(-2, 2, 4))
        >>> [t.type for t in fig.data], np.shape(fig.data[0].z)  # heatmap and both marginals
        (['heatmap', 'bar', 'bar'], (4, 3))
    """
    c = None if counts is None else as_counts(counts)
    if c is None or c.ndim != 2 or c.size == 0 or c.sum() <= 0:
        return empty_figure(_empty_text(tracked), title)
    e0 = np.asarray(edges_0, dtype=np.float64).reshape(-1)
    e1 = np.asarray(edges_1, dtype=np.float64).reshape(-1)
    bars = dict(color=PALETTE[0], line=dict(width=0))
    traces = [
        dict(
            type="heatmap",
            x=e1,
            y=e0,
            z=_color_z(c, log_color),
            customdata=c,
            name="joint",
            colorscale="Viridis",
            colorbar=dict(title=dict(text="log₁₀ count" if log_color else "count"), len=0.8, y=0.4),
            hovertemplate="θ≈%{x:.3g}, g≈%{y:.3g}: %{customdata:.4g}<extra></extra>",
        ),
        dict(
            type="bar",
            x=bin_centers(e1),
            y=c.sum(axis=0),
            width=np.diff(e1),
            yaxis="y2",
            name="parameter marginal",
            marker=bars,
        ),
        dict(
            type="bar",
            y=bin_centers(e0),
            x=c.sum(axis=1),
            width=np.diff(e0),
            xaxis="x2",
            orientation="h",
            name="gradient marginal",
            marker=bars,
        ),
    ]
    layout = _base_layout(title, uirevision=f"hist2d|{'log' if log_color else 'linear'}")
    layout.update(
        bargap=0.0,
        showlegend=False,
        xaxis=dict(domain=[0.0, 0.8], anchor="y", title=dict(text="parameter value")),
        yaxis=dict(domain=[0.0, 0.8], anchor="x", title=dict(text="gradient entry")),
        xaxis2=dict(domain=[0.82, 1.0], anchor="y", showticklabels=False),
        yaxis2=dict(domain=[0.82, 1.0], anchor="x", showticklabels=False),
    )
    return _figure(traces, layout)


def _time_z(rows: np.ndarray, normalize: bool, log_color: bool) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    if normalize:
        totals = rows.sum(axis=1, keepdims=True)
        rows = np.divide(rows, totals, out=np.zeros_like(rows), where=totals > 0)
    return _color_z(rows, log_color)


def _select_rows(n: int, budget: int) -> np.ndarray:
    """Evenly spread row indices, always keeping the first and the latest."""
    if n <= budget:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(2, budget // 2)).round().astype(np.int64))


def hist_over_time_figure(
    steps: ArrayLike,
    counts_list: Sequence[ArrayLike],
    edges: ArrayLike | None,
    log_color: bool = True,
    normalize: bool = True,
    max_rows: int = 2000,
    *,
    title: str | None = "Gradient histogram over time",
    tracked: bool = True,
) -> go.Figure:
    """Step × bin heatmap of 1D histograms (TensorBoard's "offset" view as a heatmap).

    Rows are steps (y axis), columns gradient bins (x axis, given as the bin edges), so a new
    step is a new ``z`` row and the figure grows with :func:`extend_hist_over_time`.
    ``normalize`` turns each row into fractions so steps are comparable; ``log_color`` shows
    log10 of the value with empty bins blank. More than ``max_rows`` steps are thinned to
    ``max_rows // 2`` evenly spread rows (first and latest kept).

    Args:
        steps: Steps, ascending, one per histogram.
        counts_list: ``[B]`` counts per step.
        edges: ``B + 1`` gradient-bin edges.
        log_color: Logarithmic colour scale.
        normalize: Divide each row by its total.
        max_rows: Row budget.
        title: Figure title.
        tracked: Whether the histogram is configured (empty-state text).

    Returns:
        The figure, with the extension state in ``layout.meta``.

    Example:
        >>> import numpy as np
        >>> from app.figures import hist_over_time_figure
        >>> counts = [np.array([1.0, 2, 1]), np.array([0.0, 4, 0])]  # [B] per step
        >>> fig = hist_over_time_figure([0, 10], counts, np.linspace(-1, 1, 4))
        >>> np.shape(fig.data[0].z), np.asarray(fig.data[0].y).tolist()  # rows: steps
        ((2, 3), [0, 10])
        >>> fig.layout.meta["last_step"]  # state for extend_hist_over_time
        10
    """
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    meta: dict[str, Any] = {
        "builder": "hist_time",
        "normalize": bool(normalize),
        "log_color": bool(log_color),
        "max_rows": int(max_rows),
        "n_bins": None,
        "n": 0,
        "last_step": None,
        "empty": True,
        "redraw": False,
    }
    uirevision = f"hist_time|{'log' if log_color else 'linear'}|{'norm' if normalize else 'raw'}"
    if steps.size == 0 or edges is None or len(counts_list) == 0:
        fig = empty_figure(_empty_text(tracked), title)
        return fig.update_layout(meta=meta, uirevision=uirevision)
    rows = np.stack([as_counts(c).reshape(-1) for c in counts_list])
    keep = _select_rows(steps.size, max_rows)
    steps, rows = steps[keep], rows[keep]
    unit = "fraction" if normalize else "count"
    trace = dict(
        type="heatmap",
        x=np.asarray(edges, dtype=np.float64).reshape(-1),
        y=steps,
        z=_time_z(rows, normalize, log_color),
        colorscale="Viridis",
        name="histogram",
        colorbar=dict(title=dict(text=f"log₁₀ {unit}" if log_color else unit)),
        hovertemplate="step %{y}, g≈%{x:.3g}: %{z:.3g}<extra></extra>",
    )
    meta.update(n_bins=int(rows.shape[1]), n=int(steps.size), last_step=int(steps[-1]), empty=False)
    layout = _base_layout(title, uirevision=uirevision)
    layout.update(
        xaxis=dict(title=dict(text="individual gradient entry")),
        yaxis=dict(title=dict(text="step")),
        meta=meta,
    )
    return _figure([trace], layout)


def extend_hist_over_time(
    steps: ArrayLike, counts_list: Sequence[ArrayLike], state: Mapping[str, Any]
) -> tuple[ExtendData | None, dict[str, Any]]:
    """Build the extendData payload appending new step rows to :func:`hist_over_time_figure`.

    Args:
        steps: Steps of the new histograms (steps already shown are skipped).
        counts_list: ``[B]`` counts per step.
        state: The figure's ``layout.meta`` or the state returned by the previous call.

    Returns:
        ``(payload, new_state)`` with ``payload = ({"y": [[steps]], "z": [[rows]]}, [0],
        max_rows)`` or ``None``; ``new_state["redraw"]`` asks for a rebuild (first data, a
        changed bin count, or the row budget reached).

    Raises:
        ValueError: If ``state`` does not come from :func:`hist_over_time_figure`.

    Example:
        >>> import numpy as np
        >>> from app.figures import extend_hist_over_time, hist_over_time_figure
        >>> edges = np.linspace(-1, 1, 4)
        >>> fig = hist_over_time_figure([0, 10], [np.ones(3), np.ones(3)], edges, log_color=False)
        >>> new = [np.ones(3), np.array([1.0, 2, 1])]  # step 10 again, and step 20
        >>> payload, state = extend_hist_over_time([10, 20], new, fig.layout.meta)
        >>> payload  # one new row, normalized to fractions
        ({'y': [[20]], 'z': [[[0.25, 0.5, 0.25]]]}, [0], 2000)
        >>> state["last_step"], state["redraw"]
        (20, False)
    """
    if state.get("builder") != "hist_time":
        raise ValueError("state does not come from hist_over_time_figure")
    out = copy.deepcopy(dict(state))
    out["redraw"] = False
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    keep = steps > out["last_step"] if out["last_step"] is not None else np.ones(steps.size, bool)
    if not keep.any():
        return None, out
    rows = [as_counts(c).reshape(-1) for c, k in zip(counts_list, keep, strict=True) if k]
    steps = steps[keep]
    if out["empty"] or any(r.size != out["n_bins"] for r in rows):
        return _redraw(state)
    if out["n"] + steps.size > out["max_rows"]:
        return _redraw(state)
    z = _time_z(np.stack(rows), out["normalize"], out["log_color"])
    out["n"] += int(steps.size)
    out["last_step"] = int(steps[-1])
    payload = ({"y": [steps.tolist()], "z": [[_json_list(r) for r in z]]}, [0], out["max_rows"])
    return payload, out


def layer_grid_figure(
    hist2d_by_param: Mapping[str, Sequence[Any]],
    cols: int = 4,
    log_color: bool = True,
    *,
    title: str | None = "Layer-wise gradient × parameter histograms",
    tracked: bool = True,
) -> go.Figure:
    """Grid of small per-layer 2D histograms that reveals vanishing gradients.

    Each layer is normalized to fractions of its own mass and all share one colour axis, so a
    layer whose gradients vanish shows as a single bright row at gradient 0; its subplot title
    (an annotation named ``layer``) gives the share of its mass in the central gradient bin(s).
    One heatmap trace per layer (trace name = parameter name), in the given order.

    Args:
        hist2d_by_param: ``{param name: (counts [B_g, B_p], edges_0, edges_1)}``; a
            :class:`~app.transforms.HistRecord` also works (its step is ignored).
        cols: Subplots per row.
        log_color: Logarithmic colour scale (log10 fraction, empty bins blank).
        title: Figure title.
        tracked: Whether per-layer 2D histograms are configured (empty-state text).

    Returns:
        The figure (its height grows with the number of rows).

    Example:
        >>> import numpy as np
        >>> from app.figures import layer_grid_figure
        >>> e = np.linspace(-1, 1, 4)  # 3 bins on both axes
        >>> vanished = np.zeros((3, 3))
        >>> vanished[1] = 5.0  # all gradient mass in the central bin
        >>> fig = layer_grid_figure({"0.weight": (vanished, e, e), "2.weight": (np.eye(3), e, e)})
        >>> [a.text for a in fig.layout.annotations]
        ['0.weight · 100% at 0', '2.weight · 33% at 0']
    """
    items = []
    for name, rec in hist2d_by_param.items():
        c, e0, e1 = (as_counts(rec[-3]), *(np.asarray(e, np.float64) for e in rec[-2:]))
        if c.ndim == 2 and c.sum() > 0:
            items.append((name, c, e0, e1))
    if not items:
        return empty_figure(_empty_text(tracked), title)
    cols = max(1, min(cols, len(items)))
    n_rows = math.ceil(len(items) / cols)
    hgap, vgap = 0.03, 0.25 / n_rows
    width, height = (1 - hgap * (cols - 1)) / cols, (1 - vgap * (n_rows - 1)) / n_rows
    layout = _base_layout(title, uirevision=f"layer_grid|{'log' if log_color else 'linear'}")
    traces, notes = [], []
    for k, (name, c, e0, e1) in enumerate(items):
        row, col = divmod(k, cols)
        x0, top = col * (width + hgap), 1 - row * (height + vgap)
        xa, ya = ("x", "y") if k == 0 else (f"x{k + 1}", f"y{k + 1}")
        layout[xa.replace("x", "xaxis", 1)] = dict(
            domain=[max(0.0, x0), min(1.0, x0 + width)], anchor=ya, showticklabels=False
        )
        layout[ya.replace("y", "yaxis", 1)] = dict(
            # clamp: rounding can put the last row's edge at -1e-17, which plotly rejects
            domain=[max(0.0, top - height), min(1.0, top)],
            anchor=xa,
            showticklabels=False,
        )
        traces.append(
            dict(
                type="heatmap",
                x=e1,
                y=e0,
                z=_color_z(c / c.sum(), log_color),
                customdata=c,
                coloraxis="coloraxis",
                name=name,
                xaxis=xa,
                yaxis=ya,
                hovertemplate=f"{name}<br>θ≈%{{x:.3g}}, g≈%{{y:.3g}}: %{{customdata:.4g}}"
                "<extra></extra>",
            )
        )
        note = _note(f"{name} · {central_mass(c, e0):.0%} at 0", "layer", x0 + width / 2, top)
        notes.append({**note, "yanchor": "bottom", "font": dict(size=11)})
    layout.update(
        annotations=notes,
        coloraxis=dict(
            colorscale="Viridis",
            colorbar=dict(title=dict(text="log₁₀ fraction" if log_color else "fraction")),
        ),
        height=120 + 200 * n_rows,
    )
    return _figure(traces, layout)


# --------------------------------------------------------------------------------------------
# Panel specs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PanelSpec:
    """What a dashboard panel shows; the instruments package may provide these later.

    Attributes:
        name: Unique panel id (use it in the Dash component id).
        kind: A key of :data:`PANEL_BUILDERS`: ``"line"``, ``"hist1d"``, ``"hist2d"``,
            ``"hist_time"``, ``"layer_grid"``, or a special Cockpit view (``"alpha"``,
            ``"gradient_tests"``, ``"tests_history"``, ``"batch_size"``,
            ``"hyperparameters"``, ``"performance"``).
        instrument: Instrument name in the log.
        metric: Metric name (the instrument name for its main value).
        title: Panel title.
        group: Card group, as in Cockpit: ``"step"``, ``"gradients"``, ``"curvature"``,
            ``"hyperparameters"``, ``"performance"``.
        y_log: Logarithmic y axis (line kinds) or colour scale (heatmaps).
        description: One-line explanation for a tooltip.
        param: Parameter name (``"all"`` for model-wide values).

    Example:
        >>> from app.figures import DEFAULT_PANELS, PanelSpec, build_panel
        >>> spec = PanelSpec("lr", "hyperparameters", "hyperparameters", "lr", "Learning rate",
        ...                  group="hyperparameters", y_log=True)
        >>> spec.param, build_panel(spec, None).layout.annotations[0].text
        ('all', 'no data yet')
        >>> [s.name for s in DEFAULT_PANELS][:3]  # the built-in panels
        ['performance', 'alpha', 'distance']

    """

    name: str
    kind: str
    instrument: str
    metric: str
    title: str
    group: str
    y_log: bool = False
    description: str = ""
    param: str = "all"


@dataclass(frozen=True)
class PanelOptions:
    """View settings shared by all panels (from the dashboard's controls).

    Attributes:
        smoothing: EMA smoothing in ``[0, 1)`` for line panels.
        x: ``"step"`` or ``"wall_time"``.
        max_points: Per-trace point budget.
        run: Run shown by single-run panels (gauges, histograms); ``None`` picks the first run
            that has data.
        colors: ``{run: colour}`` shared across panels.
        tracked: Whether the panel's instrument is configured (empty-state text).
        y_log: Overrides ``PanelSpec.y_log`` when not ``None`` (a per-panel log toggle).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"step": range(4), "wall_time": 0.0, "instrument": "loss",
        ...                    "metric": "loss", "param": "all", "value": [1.0, 0.8, 0.5, 0.4]})
        >>> from app.figures import DEFAULT_PANELS, PanelOptions, build_panel
        >>> spec = next(s for s in DEFAULT_PANELS if s.name == "performance")
        >>> opts = PanelOptions(smoothing=0.6, colors={"sgd": "#000000"})
        >>> fig = build_panel(spec, {"sgd": df}, options=opts)
        >>> [(t.name, t.line.color) for t in fig.data]
        [('sgd · loss', '#000000'), ('sgd · loss', '#000000')]

    """

    smoothing: float = 0.0
    x: XAxis = "step"
    max_points: int = DEFAULT_MAX_POINTS
    run: str | None = None
    colors: Mapping[str, str] | None = field(default=None, hash=False)
    tracked: bool = True
    y_log: bool | None = None


PanelBuilder = Callable[[PanelSpec, Runs, Runs, PanelOptions], go.Figure]


def _log(spec: PanelSpec, opts: PanelOptions) -> bool:
    return spec.y_log if opts.y_log is None else opts.y_log


def _pick_run(
    frames: Mapping[str, pd.DataFrame], mask_of: Callable[[pd.DataFrame], Any], opts: PanelOptions
) -> tuple[str | None, pd.DataFrame | None]:
    if opts.run is not None:
        return opts.run, frames.get(opts.run)
    for name, df in frames.items():
        if df is not None and not df.empty and bool(mask_of(df).any()):
            return name, df
    return None, None


def _title(spec: PanelSpec, run: str | None, n_runs: int) -> str:
    return f"{spec.title} — {run}" if run is not None and n_runs > 1 else spec.title


def _line_options(spec: PanelSpec, opts: PanelOptions, smoothing: bool = True) -> dict[str, Any]:
    out = dict(
        log_y=_log(spec, opts),
        x=opts.x,
        max_points=opts.max_points,
        title=spec.title,
        colors=opts.colors,
        tracked=opts.tracked,
    )
    if smoothing:
        out["smoothing"] = opts.smoothing
    return out


def _panel_line(spec: PanelSpec, runs: Runs, hists: Runs, opts: PanelOptions) -> go.Figure:
    return line_figure(runs, spec.instrument, spec.metric, spec.param, **_line_options(spec, opts))


def _panel_multi(builder: Callable[..., go.Figure], smoothing: bool = True) -> PanelBuilder:
    """Adapter for the multi-run builders that need nothing from the spec but its title."""

    def build(spec: PanelSpec, runs: Runs, hists: Runs, opts: PanelOptions) -> go.Figure:
        return builder(runs, **_line_options(spec, opts, smoothing))

    return build


def _model_hist(df: pd.DataFrame | None, instrument: str) -> HistRecord | None:
    """The model-wide histogram of a run, summed from the layers when not logged as ``"all"``.

    Falls back to the sum of the per-layer records of the latest step that share its binning
    (2D histograms are often only logged per layer).
    """
    rec = latest_hist(df, instrument, "all")
    if rec is not None:
        return rec
    layers = list(latest_hists_by_param(df, instrument).values())
    if not layers:
        return None
    last = max(layers, key=lambda r: r.step)
    same = [
        r
        for r in layers
        if r.step == last.step
        and r.counts.shape == last.counts.shape
        and np.array_equal(r.edges_0, last.edges_0)
        and np.array_equal(r.edges_1, last.edges_1)
    ]
    return last._replace(counts=np.sum([r.counts for r in same], axis=0))


def _panel_hist(dim: str) -> PanelBuilder:
    def build(spec: PanelSpec, runs: Runs, hists: Runs, opts: PanelOptions) -> go.Figure:
        def has(df: pd.DataFrame) -> Any:
            mask = df["instrument"] == spec.instrument
            return mask if spec.param == "all" else mask & (df["param"] == spec.param)

        run, df = _pick_run(hists, has, opts)
        if spec.param == "all":
            rec = _model_hist(df, spec.instrument)
        else:
            rec = latest_hist(df, spec.instrument, spec.param)
        title = _title(spec, run, len(hists))
        if rec is None:
            return empty_figure(_empty_text(opts.tracked), title)
        title = f"{title} (step {rec.step})"
        if dim == "1d":
            return hist_1d_figure(rec.counts, rec.edges_0, _log(spec, opts), title=title)
        return hist_2d_figure(rec.counts, rec.edges_0, rec.edges_1, _log(spec, opts), title=title)

    return build


def _panel_hist_time(spec: PanelSpec, runs: Runs, hists: Runs, opts: PanelOptions) -> go.Figure:
    run, df = _pick_run(hists, lambda d: d["instrument"] == spec.instrument, opts)
    steps, counts, edges = hist_history(df, spec.instrument, spec.param)
    return hist_over_time_figure(
        steps,
        counts,
        edges,
        _log(spec, opts),
        title=_title(spec, run, len(hists)),
        tracked=opts.tracked,
    )


def _panel_layer_grid(spec: PanelSpec, runs: Runs, hists: Runs, opts: PanelOptions) -> go.Figure:
    def per_param(df: pd.DataFrame) -> Any:
        return (df["instrument"] == spec.instrument) & (df["param"] != "all")

    run, df = _pick_run(hists, per_param, opts)
    return layer_grid_figure(
        latest_hists_by_param(df, spec.instrument),
        log_color=_log(spec, opts),
        title=_title(spec, run, len(hists)),
        tracked=opts.tracked,
    )


def _panel_alpha(spec: PanelSpec, runs: Runs, hists: Runs, opts: PanelOptions) -> go.Figure:
    run, df = _pick_run(runs, lambda d: d["instrument"] == spec.instrument, opts)
    _, values = tail_values(df, spec.instrument, spec.metric, spec.param)
    return alpha_gauge(values, title=_title(spec, run, len(runs)), tracked=opts.tracked)


def _panel_gradient_tests(
    spec: PanelSpec, runs: Runs, hists: Runs, opts: PanelOptions
) -> go.Figure:
    run, df = _pick_run(runs, lambda d: d["instrument"].isin(_TESTS), opts)
    vals = [latest_value(df, t, t, spec.param) for t in _TESTS]
    return gradient_tests_figure(*vals, title=_title(spec, run, len(runs)), tracked=opts.tracked)


#: ``kind -> builder(spec, runs, hists, options)``. A plain mapping, no registration: a new
#: instrument with ``kind="line"`` needs no figure code at all.
PANEL_BUILDERS: Mapping[str, PanelBuilder] = {
    "line": _panel_line,
    "hist1d": _panel_hist("1d"),
    "hist2d": _panel_hist("2d"),
    "hist_time": _panel_hist_time,
    "layer_grid": _panel_layer_grid,
    "alpha": _panel_alpha,
    "gradient_tests": _panel_gradient_tests,
    "tests_history": _panel_multi(tests_history_figure),
    "batch_size": _panel_multi(batch_size_figure),
    "hyperparameters": _panel_multi(hyperparameter_figure, smoothing=False),
    "performance": _panel_multi(performance_figure),
}


def build_panel(
    spec: PanelSpec | Mapping[str, Any],
    runs: Runs | pd.DataFrame | None,
    hists: Runs | pd.DataFrame | None = None,
    options: PanelOptions | None = None,
) -> go.Figure:
    """Build the figure of one panel from its spec.

    Args:
        spec: A :class:`PanelSpec` or a mapping with its fields.
        runs: ``{run name: scalars}`` (or one DataFrame).
        hists: ``{run name: histograms}`` (or one DataFrame), for histogram panels.
        options: Shared view settings; defaults to :class:`PanelOptions`.

    Returns:
        The figure.

    Raises:
        ValueError: If ``spec.kind`` is not a key of :data:`PANEL_BUILDERS`.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"step": range(4), "wall_time": 0.0, "instrument": "loss",
        ...                    "metric": "loss", "param": "all", "value": [1.0, 0.8, 0.5, 0.4]})
        >>> from app.figures import DEFAULT_PANELS, build_panel
        >>> spec = next(s for s in DEFAULT_PANELS if s.name == "performance")
        >>> fig = build_panel(spec, {"sgd": df})
        >>> fig.layout.title.text, [t.name for t in fig.data]
        ('Loss and metrics', ['sgd · loss'])

    """
    if not isinstance(spec, PanelSpec):
        spec = PanelSpec(**dict(spec))
    builder = PANEL_BUILDERS.get(spec.kind)
    if builder is None:
        raise ValueError(f"unknown panel kind {spec.kind!r}; known: {sorted(PANEL_BUILDERS)}")
    return builder(spec, _as_runs(runs), _as_runs(hists), options or PanelOptions())


# name, kind, title, group, y_log, instrument (default: name), metric (default: instrument),
# description
_DEFAULTS: tuple[tuple[str, str, str, str, bool, str | None, str | None, str], ...] = (
    (
        "performance",
        "performance",
        "Loss and metrics",
        "performance",
        False,
        "loss",
        None,
        "Training loss (left) and user metrics (right).",
    ),
    (
        "alpha",
        "alpha",
        "Alpha",
        "step",
        False,
        None,
        None,
        "Where on the local parabola steps land: −1 too small, +1 too large.",
    ),
    (
        "distance",
        "line",
        "Distance from init",
        "step",
        False,
        None,
        None,
        "‖θ_t − θ_0‖; flat while updates are non-zero means diffusion.",
    ),
    ("update_size", "line", "Update size", "step", True, None, None, "‖θ_{t+1} − θ_t‖."),
    (
        "grad_norm",
        "line",
        "Gradient norm",
        "gradients",
        True,
        None,
        None,
        "Norm of the mini-batch gradient.",
    ),
    (
        "gradient_tests",
        "gradient_tests",
        "Gradient tests",
        "gradients",
        False,
        "norm_test",
        None,
        "Norm disc and inner/ortho bands; beyond the dashed references: noisy gradients.",
    ),
    (
        "tests_history",
        "tests_history",
        "Gradient tests over time",
        "gradients",
        True,
        "norm_test",
        None,
        "The three tests against their thresholds.",
    ),
    (
        "batch_size",
        "batch_size",
        "Suggested batch size",
        "gradients",
        True,
        None,
        None,
        "Batch size at which each test meets its threshold; dotted: the actual batch size.",
    ),
    (
        "mean_gsnr",
        "line",
        "Mean GSNR",
        "gradients",
        True,
        None,
        None,
        "Mean gradient signal-to-noise ratio.",
    ),
    (
        "early_stopping",
        "line",
        "Early-stopping criterion",
        "gradients",
        False,
        None,
        None,
        "Evidence-based criterion; stop signal when > 0.",
    ),
    (
        "cabs",
        "line",
        "CABS batch size",
        "gradients",
        True,
        None,
        None,
        "Coupled adaptive batch size suggestion.",
    ),
    (
        "grad_hist_1d",
        "hist1d",
        "Gradient histogram",
        "gradients",
        True,
        None,
        None,
        "Individual gradient entries; much mass in the red edge bins: too large.",
    ),
    (
        "grad_hist_time",
        "hist_time",
        "Gradient histogram over time",
        "gradients",
        True,
        "grad_hist_1d",
        None,
        "Each row one step, as fractions of its mass.",
    ),
    (
        "grad_hist_2d",
        "hist2d",
        "Gradient × parameter histogram",
        "gradients",
        True,
        None,
        None,
        "Joint histogram of parameter values and individual gradients.",
    ),
    (
        "layer_grid",
        "layer_grid",
        "Layer-wise histograms",
        "gradients",
        True,
        "grad_hist_2d",
        None,
        "A single bright row at 0: vanishing gradients in that layer.",
    ),
    (
        "hess_max_ev",
        "line",
        "Hessian max eigenvalue",
        "curvature",
        True,
        None,
        None,
        "Largest Hessian eigenvalue; often moves before the loss does.",
    ),
    ("hess_trace", "line", "Hessian trace", "curvature", True, None, None, ""),
    (
        "tic_diag",
        "line",
        "TIC (diagonal)",
        "curvature",
        True,
        None,
        None,
        "Takeuchi information criterion, diagonal approximation.",
    ),
    (
        "tic_trace",
        "line",
        "TIC (trace)",
        "curvature",
        True,
        None,
        None,
        "Takeuchi information criterion, trace approximation.",
    ),
    (
        "hyperparameters",
        "hyperparameters",
        "Hyperparameters",
        "hyperparameters",
        False,
        None,
        "lr",
        "Learning rate (and other hyperparameters) per parameter group.",
    ),
)

#: The built-in panels, grouped like Cockpit's view.
DEFAULT_PANELS: tuple[PanelSpec, ...] = tuple(
    PanelSpec(
        name=name,
        kind=kind,
        instrument=inst or name,
        metric=metric or inst or name,
        title=title,
        group=group,
        y_log=y_log,
        description=desc,
    )
    for name, kind, title, group, y_log, inst, metric, desc in _DEFAULTS
)


def warm_up() -> int:
    """Build one small figure of each kind now, so Plotly loads its validators now.

    Plotly imports and builds the validators of each trace type and layout part on first use
    (the first bar chart alone costs ~40 ms). The dashboard calls this while it starts, so the
    first page load after a start does not pay for it. No log is read and nothing is cached.

    Returns:
        The number of figures built.

    Example:
        >>> from app.figures import warm_up
        >>> warm_up()
        9

    """
    rng = np.random.default_rng(0)
    e1, eg, ep = np.linspace(-1.0, 1.0, 11), np.linspace(-1.0, 1.0, 5), np.linspace(-1.0, 1.0, 6)
    joint = rng.random((4, 5))
    log = pd.DataFrame(
        {
            "step": [0, 1, 2],
            "wall_time": 0.0,
            "instrument": "loss",
            "metric": "loss",
            "param": "all",
            "value": [1.0, 0.5, 0.25],
        }
    )
    figures = [
        empty_figure(),
        line_figure({"run": log}, "loss", smoothing=0.5),
        tests_history_figure({"run": log}),
        alpha_gauge(rng.normal(size=20)),
        gradient_tests_figure(1.0, 0.5, 2.0),
        hist_1d_figure(rng.random(10), e1),
        hist_2d_figure(joint, eg, ep),
        hist_over_time_figure([0, 1], [rng.random(10), rng.random(10)], e1),
        layer_grid_figure({"w": (joint, eg, ep)}),
    ]
    for fig in figures:
        fig.to_plotly_json()
    return len(figures)


# --------------------------------------------------------------------------------------------
# CSV of a figure
# --------------------------------------------------------------------------------------------
def _array(value: Any) -> Any:
    """Decode Plotly's base64 typed arrays; other values pass through.

    Plotly 6 writes numpy arrays as ``{"dtype", "bdata", "shape"}`` in ``fig.to_dict()`` and
    JSON, so a figure coming back from the browser carries them.
    """
    if isinstance(value, Mapping) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if shape:
            arr = arr.reshape([int(n) for n in str(shape).split(",")])
        return arr
    return value


def figure_csv(fig: go.Figure | Mapping[str, Any]) -> str:
    """CSV text of exactly what a figure shows (after downsampling).

    Scatter and bar traces give one line per point (``trace,x,y``); heatmaps one line per cell
    (``trace,x,y,z``, x and y at cell centres). Traces without data are skipped.

    Args:
        fig: A figure or figure dict.

    Returns:
        CSV with header ``trace,x,y,z`` (``z`` empty for scatter/bar traces).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"step": range(4), "wall_time": 0.0, "instrument": "loss",
        ...                    "metric": "loss", "param": "all", "value": [1.0, 0.8, 0.5, 0.4]})
        >>> from app.figures import figure_csv, line_figure
        >>> print(figure_csv(line_figure({"sgd": df}, "loss")), end="")
        trace,x,y,z
        sgd,0.0,1.0,
        sgd,1.0,0.8,
        sgd,2.0,0.5,
        sgd,3.0,0.4,

    """
    data = fig.data if isinstance(fig, go.Figure) else fig.get("data", [])
    frames = []
    for i, trace in enumerate(data):
        name = (trace["name"] if "name" in trace else None) or f"trace {i}"
        x, y = _array(trace["x"]), _array(trace["y"])
        z = _array(trace["z"]) if "z" in trace else None
        if z is not None and x is not None and y is not None:
            z = np.asarray(z, dtype=np.float64)
            xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
            xs = bin_centers(xs) if xs.size == z.shape[1] + 1 else xs
            ys = bin_centers(ys) if ys.size == z.shape[0] + 1 else ys
            gx, gy = np.meshgrid(xs, ys)
            frames.append(
                pd.DataFrame({"trace": name, "x": gx.ravel(), "y": gy.ravel(), "z": z.ravel()})
            )
        elif x is not None and y is not None and len(x) == len(y) and len(x):
            frames.append(pd.DataFrame({"trace": name, "x": list(x), "y": list(y)}))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table = table.reindex(columns=["trace", "x", "y", "z"])
    buf = io.StringIO()
    table.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()
