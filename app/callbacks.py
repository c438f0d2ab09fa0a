"""Dash callbacks: one interval per client, figures that grow in place.

One server callback (:meth:`Updater.update`) owns every panel. It takes the view (selected
runs, focus run, smoothing, x axis, layer, log toggles), the tick of the single
``dcc.Interval`` and the client's ``state`` store, and answers with one of

* a **full build** (first load, or the selection, smoothing or x axis changed): every figure
  from the shared run cache (:mod:`app.data`);
* a **partial rebuild**: a new focus run or layer rebuilds only the panels that show it;
* a **log toggle**: a ``Patch`` that flips the y axes of one line panel (no data sent) or a
  rebuild of that one heatmap panel;
* a **tick**: for each panel touched by rows after the client's cursor, an ``extendData``
  payload (:func:`extend_lines_fast`, the numpy twin of :func:`app.figures.extend_lines`;
  :func:`app.figures.extend_hist_over_time` for step × bin heatmaps), or a rebuild of a small
  snapshot panel (gauges, latest histograms; at most every ``snapshot_s``). Untouched panels
  get ``no_update``. So a refresh costs O(new rows), never a redraw of all figures.

The client's ``state`` (cursors per run, each panel's extension state, the view it belongs to)
is JSON in the browser; the server keeps no per-client data, only content-keyed caches (run
rows in :class:`app.data.LogCache`; built figures and hints here, shared by clients with the
same view of the same rows, bounded LRU). Dash drops the answer of a request that a newer
request of the same callback overtook, so a state is never applied twice; to keep slow answers
from being overtaken forever, the interval reaches the main callback through ``pulse``, which
stays quiet while a main request is in flight.

Figures go to the browser with plain lists rather than Plotly's base64 typed arrays:
``Plotly.extendTraces`` can only extend real arrays.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import ALL, MATCH, Dash, Input, Output, Patch, State, ctx, dcc, html, no_update

from app.data import Cursor, LogCache, RunLog, RunNotFound
from app.figures import (
    PanelOptions,
    build_panel,
    empty_figure,
    extend_hist_over_time,
    figure_csv,
    run_colors,
)
from app.hints import hints
from app.layout import SINGLE_RUN_KINDS, Panel, panel_reads, panel_tracks
from app.transforms import downsample_minmax, ema_with_state, hist_history

__all__ = [
    "MAX_POINTS",
    "Result",
    "Updater",
    "View",
    "needed_reads",
    "plain_figure",
    "register_callbacks",
    "render_status",
]

_STATE_VERSION = 1
#: Per-trace point budget of line panels (min/max downsampled beyond it).
MAX_POINTS = 2000
#: Rows per bucket handed to the hint rules (they look at the last 200 tracked values).
_HINT_ROWS = 2000
#: Kinds that show only the latest record(s): they get the last rows of each bucket.
_LATEST_ONLY = frozenset({"gradient_tests", "hist1d", "hist2d", "layer_grid"})
_LATEST_ROWS = 8
_HINT_SCALARS = (
    "alpha",
    "distance",
    "update_size",
    "norm_test",
    "inner_test",
    "ortho_test",
    "batch_size",
    "hyperparameters",
    "hess_max_ev",
    "loss",
    "early_stopping",
)
_HINT_HISTS = (("grad_hist_1d", None), ("grad_hist_2d", None))


def needed_reads(panels: Sequence[Panel]) -> frozenset[tuple[str, str, str | None]]:
    """Every ``(table, instrument, param)`` that the panels and the hints read.

    The shared run cache holds only these rows (``keep`` of :class:`app.data.LogCache`): e.g.
    the per-tensor distance and update sizes that no panel shows are never split into buckets.
    Per-layer panels read every param (the layer picker chooses one).

    Args:
        panels: The panel catalog.

    Returns:
        The reads (``param=None``: every param of the instrument).

    Example:
        >>> from app.callbacks import needed_reads
        >>> from app.layout import panel_catalog
        >>> reads = needed_reads([p for p in panel_catalog() if p.name == "grad_norm"])
        >>> ("scalars", "grad_norm", "all") in reads  # the panel's rows
        True
        >>> ("scalars", "alpha", "all") in reads  # the hints read alpha too
        True
        >>> ("scalars", "grad_norm", "0.weight") in reads  # per-tensor rows no panel shows
        False

    """
    reads = {("scalars", inst, "all") for inst in _HINT_SCALARS}
    reads |= {("histograms", inst, param) for inst, param in _HINT_HISTS}
    for panel in panels:
        spec = dataclasses.replace(panel.spec, param=None) if panel.layer else panel.spec
        reads |= set(panel_reads(spec))
    return frozenset(reads)


# --------------------------------------------------------------------------------------------
# View and result
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    """What a client asked to see (validated control values).

    Attributes:
        runs: Selected run ids, in selection order (not yet checked against the root).
        focus: Run shown by single-run panels (gauges, histograms).
        smoothing: EMA smoothing in ``[0, 0.99]``.
        x: ``"step"`` or ``"wall_time"``.
        layer: Parameter tensor of the per-layer panels.
        logs: Log toggle per panel name.

    Example:
        >>> from app.callbacks import View
        >>> view = View.parse(["b", "a", "b", 3], "z", "0.5", "epochs", "", {"loss": ["log"]})
        >>> view  # duplicates and non-strings dropped, invalid values replaced by defaults
        View(runs=('b', 'a'), focus='b', smoothing=0.5, x='step', layer=None, logs={'loss': True})
        >>> key = view.key()  # JSON, stored in the client's state with the figures it produced
        >>> key["runs"], key["focus"], key["logs"]
        (['b', 'a'], 'b', {'loss': True})

    """

    runs: tuple[str, ...] = ()
    focus: str | None = None
    smoothing: float = 0.0
    x: str = "step"
    layer: str | None = None
    logs: Mapping[str, bool] = field(default_factory=dict)

    @classmethod
    def parse(
        cls,
        runs: Any,
        focus: Any,
        smoothing: Any,
        x: Any,
        layer: Any,
        logs: Mapping[str, Any],
    ) -> View:
        """Coerce raw control values (anything a client may send) into a view.

        Returns:
            The view; malformed values fall back to defaults.

        """
        if isinstance(runs, str):
            runs = [runs]
        if not isinstance(runs, (list, tuple)):
            runs = []
        run_ids = tuple(dict.fromkeys(r for r in runs if isinstance(r, str)))
        if focus not in run_ids:
            focus = run_ids[0] if run_ids else None
        try:
            s = float(smoothing)
        except (TypeError, ValueError):
            s = 0.0
        s = min(max(s if math.isfinite(s) else 0.0, 0.0), 0.99)
        x = x if x in ("step", "wall_time") else "step"
        layer = layer if isinstance(layer, str) and layer else None
        toggles = {str(k): isinstance(v, (list, tuple)) and "log" in v for k, v in logs.items()}
        return cls(run_ids, focus, s, x, layer, toggles)

    def key(self) -> dict[str, Any]:
        """JSON form, stored with the figures it produced."""
        return {
            "runs": list(self.runs),
            "focus": self.focus,
            "smoothing": self.smoothing,
            "x": self.x,
            "layer": self.layer,
            "logs": dict(sorted(self.logs.items())),
        }


@dataclass
class Result:
    """What one update sends to the browser (``None``: leave unchanged).

    Attributes:
        figures: ``{panel name: figure dict or Patch}``.
        extend: ``{panel name: extendData payload}``.
        classes: ``{panel name: CSS class of its card}``.
        state: The client's new state.
        hints: Children of the hint list.
        status: Children of the run status line.

    Example:
        >>> from app.callbacks import Result
        >>> result = Result()  # nothing to send: every output stays as it is
        >>> result.figures, result.extend, result.state is None
        ({}, {}, True)
        >>> Result(extend={"loss": [{"x": [[3.0]], "y": [[0.2]]}, [0], 2000]}).extend["loss"][1]
        [0]

    """

    figures: dict[str, Any] = field(default_factory=dict)
    extend: dict[str, list] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    hints: Any = None
    status: Any = None


# --------------------------------------------------------------------------------------------
# Figure helpers
# --------------------------------------------------------------------------------------------
def _plain_trace(trace: Any) -> dict[str, Any]:
    """A trace as a dict; arrays (Plotly would base64-encode them) become plain lists.

    Non-finite floats become ``None`` here: one NaN anywhere in an answer makes Plotly's JSON
    encoder decode and re-encode the whole answer to turn it into ``null``.
    """
    out = trace.to_plotly_json()
    for key, value in out.items():
        if isinstance(value, np.ndarray) or (isinstance(value, dict) and "bdata" in value):
            out[key] = _plain_list(np.asarray(trace[key]))
    return out


def plain_figure(fig: go.Figure, kind: str = "") -> dict[str, Any]:
    """The figure as a dict whose trace arrays are plain lists (extendable in the browser).

    Also fits legends to the dashboard's cards: horizontal legends go top-right, clear of the
    title; the alpha gauge's legend goes below the plot and the gradient-tests legend is small.

    Args:
        fig: A figure from :mod:`app.figures`.
        kind: The panel kind.

    Returns:
        ``{"data": [...], "layout": {...}}``.

    Example:
        >>> import numpy as np
        >>> import plotly.graph_objects as go
        >>> from app.callbacks import plain_figure
        >>> fig = go.Figure(go.Scatter(x=np.arange(3), y=np.array([1.0, np.nan, 0.5])))
        >>> plain = plain_figure(fig, kind="line")
        >>> plain["data"][0]["x"], plain["data"][0]["y"]  # lists (extendable), NaN as None
        ([0, 1, 2], [1.0, None, 0.5])

    """
    layout = fig.layout.to_plotly_json()
    legend = layout.get("legend")
    if isinstance(legend, dict):
        if kind == "alpha":
            layout["legend"] = {
                **legend,
                "orientation": "h",
                "x": 0.0,
                "xanchor": "left",
                "y": -0.3,
                "yanchor": "top",
                "font": {"size": 10},
            }
            layout["margin"] = {**layout.get("margin", {}), "b": 90}
        elif kind == "gradient_tests":
            layout["legend"] = {**legend, "font": {"size": 10}}
        elif legend.get("orientation") == "h":
            layout["legend"] = {**legend, "x": 1.0, "xanchor": "right"}
    return {"data": [_plain_trace(trace) for trace in fig.data], "layout": layout}


# --------------------------------------------------------------------------------------------
# Growing line figures without pandas
# --------------------------------------------------------------------------------------------
Series = Mapping[tuple[str, str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _xy(rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None, x: str):
    """:func:`app.transforms.series` on raw arrays.

    Sorted by step, a repeated step keeps its last row, then sorted by wall time for
    ``x="wall_time"``.
    """
    if rows is None or rows[0].size == 0:
        empty = np.empty(0, dtype=np.float64)
        return empty, empty
    step, wall, value = rows
    order = np.argsort(step, kind="stable")
    step, wall, value = step[order], wall[order], value[order]
    keep = np.ones(step.size, dtype=bool)
    keep[:-1] = step[1:] != step[:-1]
    step, wall, value = step[keep], wall[keep], value[keep]
    if x == "wall_time":
        order = np.argsort(wall, kind="stable")
        return wall[order].astype(np.float64), value[order].astype(np.float64)
    return step.astype(np.float64), value.astype(np.float64)


def _plain_list(values: np.ndarray) -> list:
    """Nested lists of ``values``; non-finite floats become ``None`` (JSON ``null``)."""
    if values.dtype.kind not in "fc":
        return values.tolist()
    finite = np.isfinite(values)
    if finite.all():
        return values.tolist()
    out = values.astype(object)
    out[~finite] = None
    return out.tolist()


def extend_lines_fast(
    new: Mapping[str, Series], state: Mapping[str, Any]
) -> tuple[list | None, dict[str, Any]]:
    """:func:`app.figures.extend_lines` on numpy arrays instead of DataFrames.

    Same payload and state (the tests check both against the reference on the same rows),
    without pandas' per-call overhead: a refresh of 20 line panels costs milliseconds.

    Args:
        new: ``{run: {(instrument, metric, param): (step, wall_time, value)}}``, only the
            series this panel reads.
        state: The figure's extension state.

    Returns:
        ``(payload, new_state)`` as :func:`app.figures.extend_lines` (payload as a list).

    """
    if state.get("builder") != "lines":
        raise ValueError("state does not come from a line-type figure builder")
    out = copy.deepcopy(dict(state))
    out["redraw"] = False
    x, smoothing, budget = out["x"], out["smoothing"], out["max_points"]
    traces = out["traces"]
    known = {(t["run"], t["instrument"], t["metric"], t["param"]) for t in traces}
    instruments = {t["instrument"] for t in traces} | {w[0] for w in out["watch"]}

    def redraw() -> tuple[None, dict[str, Any]]:
        again = copy.deepcopy(dict(state))
        again["redraw"] = True
        return None, again

    for run, series in new.items():
        keys = [k for k, rows in series.items() if rows[0].size]
        if not keys:
            continue
        if run not in out["runs"]:
            if any(k[0] in instruments for k in keys):
                return redraw()
            continue
        for inst, metric, param in out["watch"]:
            for i, m, p in keys:
                if i == inst and metric in (None, m) and param in (None, p):
                    if (run, i, m, p) not in known:
                        return redraw()
    xs_out: list[list] = []
    ys_out: list[list] = []
    indices: list[int] = []
    for i, t in enumerate(traces):
        rows = new.get(t["run"], {}).get((t["instrument"], t["metric"], t["param"]))
        xs, ys = _xy(rows, x)
        if t["last_x"] is not None:
            keep = xs > t["last_x"]
            xs, ys = xs[keep], ys[keep]
        if xs.size == 0:
            continue
        if out["empty"]:
            return redraw()
        last_x = float(xs[-1])
        if t["role"] == "smooth":
            ys, t["ema"] = ema_with_state(ys, smoothing, t["ema"])
        if xs.size > budget:
            xs, ys = downsample_minmax(xs, ys, budget)
        if t["n"] + xs.size > budget:
            return redraw()
        t["n"] += int(xs.size)
        t["last_x"] = last_x
        xs_out.append(_plain_list(xs * 1000.0 if x == "wall_time" else xs))
        ys_out.append(_plain_list(ys))
        indices.append(i)
    if not indices:
        return None, out
    return [{"x": xs_out, "y": ys_out}, indices, int(budget)], out


def _state_of(fig: go.Figure | dict) -> dict[str, Any]:
    """Per-panel state: the builder's extension state and the y axes a log toggle flips."""
    layout = fig["layout"] if isinstance(fig, dict) else fig.layout.to_plotly_json()
    meta = layout.get("meta")
    axes = [
        k
        for k, v in layout.items()
        if k.startswith("yaxis") and isinstance(v, dict) and not v.get("overlaying")
    ]
    builder = meta.get("builder") if isinstance(meta, dict) else None
    return {"meta": meta if builder in ("lines", "hist_time") else None, "axes": sorted(axes)}


def _only(panel: Panel, frame: pd.DataFrame) -> pd.DataFrame:
    """The rows a panel shows: drops the metrics of its instrument it does not declare."""
    if panel.metrics is None or frame is None or frame.empty:
        return frame
    keep = (frame["instrument"] != panel.spec.instrument) | frame["metric"].isin(panel.metrics)
    return frame if bool(keep.all()) else frame[keep]


def _select_series(
    panel: Panel, reads: Sequence[tuple[str, str, str | None]], series: Series
) -> dict[tuple[str, str, str], Any]:
    """The new series a line panel reads (and shows: see :attr:`Panel.metrics`)."""
    wanted = [(inst, param) for table, inst, param in reads if table == "scalars"]
    out = {}
    for (inst, metric, param), rows in series.items():
        if any(inst == i and (p is None or param == p) for i, p in wanted):
            if panel.metrics is None or inst != panel.spec.instrument or metric in panel.metrics:
                out[(inst, metric, param)] = rows
    return out


def _card_class(panel: Panel, compact: bool) -> str:
    wide = " cp-wide" if panel.wide else ""
    return f"cp-card{wide} cp-compact" if compact else f"cp-card{wide}"


def _touches(reads: Sequence[tuple[str, str, str | None]], touched: set[tuple[str, str, str]]):
    for table, inst, param in reads:
        for t, i, p in touched:
            if t == table and i == inst and (param is None or p == param):
                return True
    return False


# --------------------------------------------------------------------------------------------
# The update logic (no Dash objects besides Patch/html)
# --------------------------------------------------------------------------------------------
class _SharedCache:
    """Bounded, thread-safe LRU of built figures and hints, keyed by what they show."""

    def __init__(self, max_entries: int = 256) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)


class Updater:
    """Builds and grows the figures of all panels for one client request.

    Args:
        cache: The shared run cache.
        panels: The panel catalog (:func:`app.layout.panel_catalog`).
        max_points: Per-trace point budget of line panels.
        hint_window: Tracked values each hint rule looks at.
        snapshot_s: Gauges and latest-histogram panels are rebuilt at most this often (they
            are whole small figures, not extensions); line and heatmap-over-time panels grow
            on every tick.
        hints_s: The hints are recomputed at most this often.

    Example:
        One client's life: a full build, then ticks that send only the new points.

        >>> import tempfile
        >>> from pathlib import Path
        >>> from app.callbacks import Updater, View
        >>> from app.data import LogCache
        >>> from app.layout import panel_catalog
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> writer = LogWriter(Path(tmp.name) / "sgd")
        >>> for step in range(3):
        ...     writer.add_scalar(step, "grad_norm", "grad_norm", "all", 1.0 / (step + 1))
        >>> writer.flush()
        >>> panels = [p for p in panel_catalog() if p.name == "grad_norm"]
        >>> updater = Updater(LogCache(tmp.name, min_refresh_s=0.0), panels)
        >>> view = View.parse(["sgd"], None, 0.0, "step", None, {})
        >>> first = updater.full(view)  # what update() answers on a first load
        >>> sorted(first.figures), first.state["cursors"]["sgd"]["scalars"]
        (['grad_norm'], 0)
        >>> writer.add_scalar(3, "grad_norm", "grad_norm", "all", 0.2)
        >>> writer.flush()
        >>> tick = updater.tick(view, first.state)
        >>> tick.figures, tick.extend["grad_norm"]  # no figure, one new point
        ({}, [{'x': [[3.0]], 'y': [[0.2]]}, [0], 2000])
        >>> updater.update("tick", view, tick.state).extend  # nothing new since
        {}
        >>> logged = View.parse(["sgd"], None, 0.0, "step", None, {"grad_norm": ["log"]})
        >>> toggled = updater.toggle_log("grad_norm", logged, tick.state)
        >>> type(toggled.figures["grad_norm"]).__name__  # only the axis types change
        'Patch'
        >>> rebuilt = updater.rebuild(["grad_norm"], logged, toggled.state)  # at the cursors
        >>> fig, compact = updater.build(panels[0], logged, {"sgd": updater.cache.get("sgd")})
        >>> len(fig.data[0].x), fig.layout.yaxis.type, compact
        (4, 'log', False)
        >>> writer.close()
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        cache: LogCache,
        panels: Sequence[Panel],
        max_points: int = MAX_POINTS,
        hint_window: int = 200,
        snapshot_s: float = 3.0,
        hints_s: float = 5.0,
    ) -> None:
        self.cache = cache
        self.snapshot_s = float(snapshot_s)
        self.hints_s = float(hints_s)
        self._shared = _SharedCache()
        self.panels = list(panels)
        self.by_name = {p.name: p for p in self.panels}
        self.max_points = int(max_points)
        self.hint_window = int(hint_window)

    # ---------------------------------------------------------------- entry point
    def update(self, trigger: Any, view: View, state: Mapping[str, Any] | None) -> Result:
        """Answer one request.

        Args:
            trigger: ``"tick"``, a log-toggle id ``{"type": "log", "name": ...}``, or anything
                else (a view change: full build).
            view: The client's view.
            state: The client's state store (``None`` on first load).

        Returns:
            What to send.

        """
        valid = (
            isinstance(state, Mapping)
            and state.get("v") == _STATE_VERSION
            and isinstance(state.get("panels"), Mapping)
        )
        if not valid:
            return self.full(view)
        old, new = state.get("view") or {}, view.key()
        changed = {k for k in new if new[k] != old.get(k)}
        if trigger == "tick" and not changed:
            return self.tick(view, state)
        if changed == {"logs"} and isinstance(trigger, Mapping) and trigger.get("type") == "log":
            return self.toggle_log(str(trigger.get("name")), view, state)
        if changed and changed <= {"focus", "layer"}:
            # Only the panels that depend on the focus run or the layer are rebuilt.
            names = [
                p.name
                for p in self.panels
                if ("layer" in changed and p.layer)
                or ("focus" in changed and (p.layer or p.spec.kind in SINGLE_RUN_KINDS))
            ]
            result = self.rebuild(names, view, state)
            if "focus" in changed:
                data = self._open(view)
                result.hints = self._hints(view, data)
                result.state["hints_at"] = time.time()
            return result
        return self.full(view)

    # ---------------------------------------------------------------- data access
    def _open(self, view: View) -> dict[str, tuple[RunLog, Cursor]]:
        data = {}
        for run in view.runs:
            try:
                data[run] = self.cache.get(run)
            except RunNotFound:
                continue  # refused or deleted: not shown (the run list says why)
        return data

    def _spec(self, panel: Panel, view: View, n_runs: int):
        spec = panel.spec
        if panel.layer:
            if view.layer is None:
                return None
            spec = dataclasses.replace(spec, param=view.layer, title=f"{spec.title} · {view.layer}")
        if spec.kind in SINGLE_RUN_KINDS and n_runs > 1 and view.focus is not None:
            spec = dataclasses.replace(spec, title=f"{spec.title} — {view.focus}")
        return spec

    def _runs_of(self, spec, view: View, data: Mapping[str, Any]) -> list[str]:
        if spec.kind in SINGLE_RUN_KINDS:
            return [view.focus] if view.focus in data else []
        return [r for r in view.runs if r in data]

    def build(
        self, panel: Panel, view: View, data: Mapping[str, tuple[RunLog, Cursor]]
    ) -> tuple[go.Figure, bool]:
        """The figure of one panel from all rows up to each run's snapshot cursor.

        Returns:
            ``(figure, compact)``; ``compact`` when no shown run tracks the panel's instrument
            and none has rows for it (the card shrinks to its "not tracked" message).

        """
        spec = self._spec(panel, view, len(data))
        if spec is None:
            return empty_figure("pick a parameter tensor above", panel.spec.title), False
        runs = self._runs_of(spec, view, data)
        reads = panel_reads(spec)
        frames: dict[str, dict[str, pd.DataFrame]] = {"scalars": {}, "histograms": {}}
        latest_only = spec.kind in _LATEST_ONLY
        for table in frames:
            keys = [(inst, param) for t, inst, param in reads if t == table]
            if keys:
                for run in runs:
                    log, cursor = data[run]
                    frames[table][run] = (
                        log.tail(table, keys, _LATEST_ROWS, cursor)
                        if latest_only
                        else log.frame(table, keys, cursor)
                    )
        frames["scalars"] = {r: _only(panel, f) for r, f in frames["scalars"].items()}
        tracks = panel_tracks(spec)
        tracked = not runs or any(
            data[r][0].tracked is None or bool(data[r][0].tracked & tracks) for r in runs
        )
        if not tracked and not any(len(f) for fs in frames.values() for f in fs.values()):
            return empty_figure("not tracked", spec.title), True
        options = PanelOptions(
            smoothing=view.smoothing,
            x=view.x,  # type: ignore[arg-type]
            max_points=self.max_points,
            run=view.focus if spec.kind in SINGLE_RUN_KINDS else None,
            colors=run_colors(view.runs),
            tracked=tracked,
            y_log=view.logs.get(panel.name, spec.y_log),
        )
        scalars = frames["scalars"] or {r: None for r in runs}
        return build_panel(spec, scalars, frames["histograms"], options), False

    def _render(self, panel: Panel, view: View, data: Mapping[str, tuple[RunLog, Cursor]]):
        """``(figure dict, panel state)`` of a fresh build.

        Builds are shared: clients with the same view of the same rows (same cursors) get the
        same figure, built once (a bounded cache keyed by content, never by client).
        """
        key = (
            panel.name,
            json.dumps(view.key(), sort_keys=True),
            tuple(
                sorted((r, c["epoch"], c["scalars"], c["histograms"]) for r, (_, c) in data.items())
            ),
        )
        hit = self._shared.get(key)
        if hit is None:
            fig, compact = self.build(panel, view, data)
            plain = plain_figure(fig, panel.spec.kind)
            hit = (plain, {**_state_of(plain), "compact": compact})
            self._shared.put(key, hit)
        plain, panel_state = hit
        return plain, {**panel_state, "built": time.time()}

    # ---------------------------------------------------------------- full build
    def full(self, view: View) -> Result:
        """Every figure from scratch (first load or a changed view).

        Returns:
            The result with all figures, a fresh state, hints and status.

        """
        data = self._open(view)
        result = Result()
        states = {}
        for panel in self.panels:
            fig, states[panel.name] = self._render(panel, view, data)
            result.figures[panel.name] = fig
            result.classes[panel.name] = _card_class(panel, states[panel.name]["compact"])
        result.state = {
            "v": _STATE_VERSION,
            "view": view.key(),
            "cursors": {run: dict(cursor) for run, (_, cursor) in data.items()},
            "panels": states,
        }
        result.state["status"] = self._status(view, data)
        result.state["hints_at"] = time.time()
        result.hints = self._hints(view, data)
        result.status = render_status(result.state["status"])
        return result

    # ---------------------------------------------------------------- log toggle
    def toggle_log(self, name: str, view: View, state: Mapping[str, Any]) -> Result:
        """Flip one panel's y scale: a Patch of its axes (line panels) or a rebuild.

        Returns:
            The result for that one panel.

        """
        panel = self.by_name.get(name)
        result = Result(state=dict(state))
        result.state["view"] = view.key()
        if panel is None:
            return result
        panel_state = state["panels"].get(name) or {}
        meta = panel_state.get("meta")
        if isinstance(meta, Mapping) and meta.get("builder") == "lines" and not meta.get("empty"):
            on = view.logs.get(name, False)
            patch = Patch()
            for axis in panel_state.get("axes", []):
                patch["layout"][axis]["type"] = "log" if on else "linear"
                patch["layout"][axis]["autorange"] = True
            result.figures[name] = patch
            return result
        return self.rebuild([name], view, state)

    def rebuild(self, names: Sequence[str], view: View, state: Mapping[str, Any]) -> Result:
        """Rebuild some panels from the rows up to the client's cursors (the others stay).

        Building at the client's cursors keeps every panel consistent with the state, so the
        next tick extends all of them from the same place.

        Returns:
            The rebuilt figures and the updated state.

        """
        result = Result(state={**state, "view": view.key()})
        cursors = state.get("cursors", {})
        data = {
            run: (log, Cursor(**cursors[run]))
            for run, (log, _) in self._open(view).items()
            if run in cursors and cursors[run].get("epoch") == log.epoch
        }
        panels_state = dict(state["panels"])
        for name in names:
            panel = self.by_name[name]
            fig, new_state = self._render(panel, view, data)
            result.figures[name] = fig
            if new_state["compact"] != (panels_state.get(name) or {}).get("compact"):
                result.classes[name] = _card_class(panel, new_state["compact"])
            panels_state[name] = new_state
        result.state["panels"] = panels_state
        return result

    # ---------------------------------------------------------------- tick
    def tick(self, view: View, state: Mapping[str, Any]) -> Result:
        """Grow the figures by the rows written since the client's cursors.

        Returns:
            extendData payloads, rebuilt small panels, the advanced state; nothing when
            nothing is new.

        """
        data = self._open(view)
        cursors = state.get("cursors", {})
        if set(data) != set(cursors) or any(
            cursors[r].get("epoch") != data[r][1]["epoch"] for r in data
        ):
            return self.full(view)  # a run was deleted, replaced or appeared
        touched: dict[str, set[tuple[str, str, str]]] = {}
        for run, (log, cursor) in data.items():
            old = cursors[run]
            if any(cursor[t] != old[t] for t in ("scalars", "histograms")):
                touched[run] = log.touched(Cursor(**old), cursor)
        now = time.time()
        new_series: dict[str, Series] = {}

        def series_of(run: str) -> Series:
            if run not in new_series:  # once per run and tick, shared by all line panels
                log, upto = data[run]
                new_series[run] = log.new_series(Cursor(**cursors[run]), upto)
            return new_series[run]

        panels_state = dict(state["panels"])
        due = {  # snapshot panels whose rebuild was put off and may happen now
            name
            for name, p in panels_state.items()
            if p and p.get("dirty") and now - p.get("built", 0.0) >= self.snapshot_s
        }
        hints_due = state.get("hints_dirty") and now - state.get("hints_at", 0.0) >= self.hints_s
        result = Result()
        status = self._status(view, data)
        if not touched and not due and not hints_due:
            if status != state.get("status"):
                result.status = render_status(status)
                result.state = {**state, "status": status}
            return result
        for panel in self.panels:
            spec = self._spec(panel, view, len(data))
            if spec is None:
                continue
            runs = [r for r in self._runs_of(spec, view, data) if r in touched]
            reads = panel_reads(spec)
            if panel.name not in due and not any(_touches(reads, touched[r]) for r in runs):
                continue
            pstate = panels_state.get(panel.name) or {}
            meta = pstate.get("meta")
            builder = meta.get("builder") if isinstance(meta, Mapping) else None
            payload, new_meta = None, None
            if builder == "lines":
                new = {r: _select_series(panel, reads, series_of(r)) for r in runs}
                payload, new_meta = extend_lines_fast(new, meta)
            elif builder == "hist_time":
                run = runs[0]
                new = data[run][0].new_rows(
                    "histograms",
                    Cursor(**cursors[run]),
                    data[run][1],
                    [(spec.instrument, spec.param)],
                )
                steps, counts, _ = hist_history(new, spec.instrument, spec.param)
                payload, new_meta = extend_hist_over_time(steps, counts, meta)
            elif now - pstate.get("built", 0.0) < self.snapshot_s:
                # A gauge or latest histogram: rebuilt at most every snapshot_s seconds.
                panels_state[panel.name] = {**pstate, "dirty": True}
                continue
            if new_meta is not None and not new_meta.get("redraw"):
                panels_state[panel.name] = {**pstate, "meta": new_meta}
                if payload is not None:
                    result.extend[panel.name] = list(payload)
                continue
            fig, panels_state[panel.name] = self._render(panel, view, data)
            result.figures[panel.name] = fig
            if panels_state[panel.name]["compact"] != pstate.get("compact"):
                result.classes[panel.name] = _card_class(panel, panels_state[panel.name]["compact"])
        result.state = {
            **state,
            "cursors": {run: dict(cursor) for run, (_, cursor) in data.items()},
            "panels": panels_state,
            "status": status,
        }
        if view.focus in touched or hints_due:
            if hints_due or now - state.get("hints_at", 0.0) >= self.hints_s:
                result.hints = self._hints(view, data)
                result.state.update(hints_at=now, hints_dirty=False)
            else:
                result.state["hints_dirty"] = True
        if status != state.get("status"):
            result.status = render_status(status)
        return result

    # ---------------------------------------------------------------- hints and status
    def _hints(self, view: View, data: Mapping[str, tuple[RunLog, Cursor]]) -> list:
        if view.focus not in data:
            return [html.Div("Select a run to get hints.", className="cp-hint-empty")]
        log, cursor = data[view.focus]
        key = ("hints", view.focus, len(view.runs) > 1, tuple(sorted(cursor.items())))
        hit = self._shared.get(key)
        if hit is None:
            hit = self._compute_hints(view, log, cursor)
            self._shared.put(key, hit)
        return hit

    def _compute_hints(self, view: View, log: RunLog, cursor: Cursor) -> list:
        scalars = log.tail("scalars", [(i, "all") for i in _HINT_SCALARS], _HINT_ROWS, cursor)
        hists = log.tail("histograms", _HINT_HISTS, 1, cursor)
        found = hints(scalars, window=self.hint_window, hists=hists)
        if not found:
            text = "Nothing unusual in the latest window." if len(scalars) else "No data yet."
            return [html.Div(text, className="cp-hint-empty")]
        prefix = f"{view.focus}: " if len(view.runs) > 1 else ""
        return [
            html.Div(
                className=f"cp-hint {h.level}",
                children=[html.Span(h.instrument, className="cp-hint-tag"), prefix + h.text],
                **{"data-rule": h.rule},
            )
            for h in found
        ]

    def _status(self, view: View, data: Mapping[str, tuple[RunLog, Cursor]]) -> list[dict]:
        """JSON description of the status line (compared between ticks, rendered on change)."""
        colors = run_colors(view.runs)
        return [
            {
                "run": run,
                "color": colors[run],
                "status": data[run][0].status(),
                "step": data[run][0].max_step,
            }
            for run in view.runs
            if run in data
        ]


def render_status(items: Sequence[Mapping[str, Any]]) -> list:
    """The status line: a coloured dot, id, status badge and latest step per shown run.

    Args:
        items: From :meth:`Updater._status`.

    Returns:
        Dash components.

    Example:
        >>> from app.callbacks import render_status
        >>> line = render_status([{"run": "sgd", "status": "live", "color": "#1F77B4", "step": 3}])
        >>> [part.children for part in line[0].children[1:]]
        ['sgd', 'live', 'step 3']
        >>> render_status([])[0].children
        'no run selected'

    """
    if not items:
        return [html.Span("no run selected", className="cp-badge")]
    return [
        html.Span(
            className="cp-run",
            children=[
                html.Span(className="cp-dot", style={"background": it["color"]}),
                html.Span(it["run"]),
                html.Span(it["status"], className=f"cp-badge {it['status']}"),
                html.Span("no steps yet" if it["step"] is None else f"step {it['step']}"),
            ],
        )
        for it in items
    ]


# --------------------------------------------------------------------------------------------
# Dash wiring
# --------------------------------------------------------------------------------------------
_CSV_JS = """
function(n, id) {
    const nu = window.dash_clientside.no_update;
    if (!n) { return nu; }
    const key = JSON.stringify({name: id.name, type: "panel"});
    const host = document.getElementById(key);
    const gd = host && host.querySelector(".js-plotly-plot");
    if (!gd || !gd.data) { return nu; }
    const plain = v => (v && typeof v === "object" && !Array.isArray(v) && !("bdata" in v))
        ? Array.from(v) : v;
    const traces = gd.data.map(t => {
        const out = {name: t.name || null, x: plain(t.x), y: plain(t.y)};
        if (t.z !== undefined) { out.z = Array.isArray(t.z) ? t.z.map(plain) : t.z; }
        return out;
    });
    return {data: traces, clicks: n};
}
"""

# The interval only fires the main callback when no main request is in flight (its output
# "status" carries data-dash-is-loading meanwhile). Otherwise slow answers would be dropped by
# the renderer in favour of newer requests, over and over.
_PULSE_JS = """
function(n) {
    const busy = document.querySelector('#status[data-dash-is-loading="true"]');
    return busy ? window.dash_clientside.no_update : n;
}
"""

_LIVE_JS = """
function(value) { return !(value && value.indexOf("live") >= 0); }
"""


def _run_options(cache: LogCache) -> list[dict[str, str]]:
    return [{"label": f"{r.run_id} · {r.status}", "value": r.run_id} for r in cache.list_runs()]


def register_callbacks(
    app: Dash, cache: LogCache, panels: Sequence[Panel], **updater_options: Any
) -> Updater:
    """Attach the dashboard's callbacks to ``app``.

    Args:
        app: The Dash app whose layout comes from :func:`app.layout.build_layout`.
        cache: The shared run cache.
        panels: The panel catalog used for the layout.
        **updater_options: Keyword arguments of :class:`Updater`.

    Returns:
        The :class:`Updater` behind the main callback.

    Example:
        What :func:`app.create_app` does:

        >>> import tempfile
        >>> from dash import Dash
        >>> from app.callbacks import needed_reads, register_callbacks
        >>> from app.data import LogCache
        >>> from app.layout import build_layout, panel_catalog
        >>> tmp = tempfile.TemporaryDirectory()
        >>> panels = panel_catalog()
        >>> cache = LogCache(tmp.name, keep=needed_reads(panels))
        >>> app = Dash("cockpit-demo")
        >>> app.layout = build_layout(panels, tmp.name, refresh_ms=2000)
        >>> updater = register_callbacks(app, cache, panels, snapshot_s=5.0)
        >>> updater.snapshot_s, len(updater.panels) == len(panels)
        (5.0, True)
        >>> any("panel" in output for output in app.callback_map)  # the main callback
        True
        >>> tmp.cleanup()

    """
    updater = Updater(cache, panels, **updater_options)

    @app.callback(
        Output("runs", "value"),
        Output("notice", "children"),
        Input("url", "search"),
    )
    def select_from_url(search: Any) -> tuple[list[str], Any]:
        """Initial selection: ``?run=a&run=b``, else the newest run."""
        query = parse_qs(search[1:] if isinstance(search, str) and search else "")
        wanted = [r for r in query.get("run", []) if r]
        known = [r.run_id for r in cache.list_runs()]
        if not wanted:
            if not known:
                return [], html.Div(
                    f"No runs under {cache.root} yet. Start training with "
                    "Cockpit(..., logdir=ROOT/<run name>); runs appear here by themselves."
                )
            return [known[-1]], None
        chosen, refused = [], []
        for run in wanted:
            try:
                cache.meta(run)
            except RunNotFound:
                refused.append(run)
            else:
                chosen.append(run)
        notice = None
        if refused:
            notice = html.Div(
                "Refused: "
                + ", ".join(repr(r) for r in refused)
                + f" (not a run directly under {cache.root})."
            )
        return chosen, notice

    @app.callback(
        Output("runs", "options"),
        Output("runs", "value", allow_duplicate=True),
        Output("notice", "children", allow_duplicate=True),
        Input("tick", "n_intervals"),
        State("runs", "value"),
        prevent_initial_call=True,
    )
    def refresh_run_list(_: Any, selected: Any) -> tuple[Any, Any, Any]:
        """Keep the run list current; drop selected runs that were deleted."""
        options = _run_options(cache)
        known = {o["value"] for o in options}
        selected = [r for r in (selected or []) if isinstance(r, str)]
        gone = [r for r in selected if r not in known]
        if not gone:
            return options, no_update, no_update
        notice = html.Div(
            "Run " + ", ".join(repr(r) for r in gone) + " was deleted; it is no longer shown."
        )
        return options, [r for r in selected if r in known], notice

    @app.callback(
        Output("focus", "options"),
        Output("focus", "value"),
        Input("runs", "value"),
        State("focus", "value"),
    )
    def choose_focus(runs: Any, focus: Any) -> tuple[list, Any]:
        """The focus run is one of the selected runs (the first by default)."""
        runs = [r for r in (runs or []) if isinstance(r, str)]
        options = [{"label": f" {r}", "value": r} for r in runs]
        return options, focus if focus in runs else (runs[0] if runs else None)

    @app.callback(
        Output("layer", "options"),
        Output("layer", "value"),
        Input("focus", "value"),
        State("layer", "value"),
    )
    def choose_layer(focus: Any, layer: Any) -> tuple[list, Any]:
        """Parameter tensors of the focus run (model order)."""
        try:
            log, _ = cache.get(focus)
        except RunNotFound:
            return [], None
        params = log.params()
        options = [{"label": p, "value": p} for p in params]
        return options, layer if layer in params else (params[0] if params else None)

    @app.callback(
        Output({"type": "panel", "name": ALL}, "figure"),
        Output({"type": "panel", "name": ALL}, "extendData"),
        Output({"type": "card", "name": ALL}, "className"),
        Output("state", "data"),
        Output("hints", "children"),
        Output("status", "children"),
        Input("pulse", "data"),
        Input("runs", "value"),
        Input("focus", "value"),
        Input("smoothing", "value"),
        Input("xaxis", "value"),
        Input("layer", "value"),
        Input({"type": "log", "name": ALL}, "value"),
        State("state", "data"),
    )
    def update(_tick, runs, focus, smoothing, x, layer, logs, state):
        """The main callback: full build, log toggle or incremental tick."""
        names = [o["id"]["name"] for o in ctx.outputs_list[0]]
        log_names = [i["id"]["name"] for i in ctx.inputs_list[6]]
        view = View.parse(runs, focus, smoothing, x, layer, dict(zip(log_names, logs, strict=True)))
        trigger = "tick" if ctx.triggered_id == "pulse" else ctx.triggered_id
        result = updater.update(trigger, view, state)
        return (
            [result.figures.get(n, no_update) for n in names],
            [result.extend.get(n, no_update) for n in names],
            [result.classes.get(n, no_update) for n in names],
            no_update if result.state is None else result.state,
            no_update if result.hints is None else result.hints,
            no_update if result.status is None else result.status,
        )

    app.clientside_callback(_LIVE_JS, Output("tick", "disabled"), Input("live", "value"))
    app.clientside_callback(
        _PULSE_JS, Output("pulse", "data"), Input("tick", "n_intervals"), prevent_initial_call=True
    )
    app.clientside_callback(
        _CSV_JS,
        Output({"type": "csvdata", "name": MATCH}, "data"),
        Input({"type": "csv", "name": MATCH}, "n_clicks"),
        State({"type": "csv", "name": MATCH}, "id"),
        prevent_initial_call=True,
    )

    @app.callback(
        Output({"type": "download", "name": MATCH}, "data"),
        Input({"type": "csvdata", "name": MATCH}, "data"),
        prevent_initial_call=True,
    )
    def download_csv(shown: Any) -> Any:
        """CSV of exactly what the panel shows (the browser's trace data)."""
        if not isinstance(shown, Mapping) or not isinstance(shown.get("data"), list):
            return no_update
        name = ctx.triggered_id["name"] if isinstance(ctx.triggered_id, Mapping) else "panel"
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(name))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return dcc.send_string(figure_csv({"data": shown["data"]}), f"{safe}-{stamp}.csv")

    return updater
