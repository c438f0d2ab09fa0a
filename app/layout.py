"""Dash layout of the dashboard: the panel catalog, grouped like the Cockpit view, and components.

What is shown where is data, not code:

* :data:`app.figures.DEFAULT_PANELS` are placed into Cockpit's sections (STEP SIZE, GRADIENTS,
  CURVATURE, then hyperparameters and performance), followed by the views beyond the paper:
  histograms over time and a per-layer section (:data:`LAYER_PANELS`, whose parameter comes
  from a picker).
* Every registered instrument that no built-in panel reads gets a plain line panel derived from
  its ``panel`` declaration (:class:`instruments.base.PanelSpec`): one per declared metric, in
  the section its ``group`` names. So adding an instrument needs no app code.

Component ids (used by :mod:`app.callbacks`): each panel's graph is
``{"type": "panel", "name": <panel name>}``; its log toggle ``{"type": "log", ...}``, CSV button
``{"type": "csv", ...}``, CSV buffer ``{"type": "csvdata", ...}``, download
``{"type": "download", ...}`` and card ``{"type": "card", ...}`` share the name. Global
controls: ``runs``, ``focus``, ``smoothing``, ``xaxis``, ``live``, ``layer``; the single
``dcc.Interval`` is ``tick`` and the per-client cursor and figure states live in the
``dcc.Store`` ``state``. ``pulse`` relays the interval to the main callback (see
:mod:`app.callbacks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dash import dcc, html

from app.figures import DEFAULT_PANELS, PanelSpec

__all__ = [
    "CSS",
    "LAYER_PANELS",
    "Panel",
    "SECTIONS",
    "SINGLE_RUN_KINDS",
    "build_layout",
    "panel_catalog",
    "panel_reads",
    "panel_tracks",
]

#: ``(key, title, subtitle)`` of the sections, top to bottom.
SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("step", "Step size", "Is the learning rate right? α, how far and how fast the weights move."),
    ("gradients", "Gradients", "How noisy and how large are the gradients?"),
    ("curvature", "Curvature", "How sharp is the loss landscape?"),
    ("bottom", "Hyperparameters & performance", "What the optimizer used, and how training goes."),
    ("time", "Histograms over time", "Each row one tracked step, as fractions of its mass."),
    ("layers", "Per layer", "One parameter tensor at a time, and all layers side by side."),
    ("other", "More instruments", "Panels declared by registered instruments."),
)
_SECTION_OF_GROUP = {
    "step": "step",
    "step_size": "step",
    "gradients": "gradients",
    "curvature": "curvature",
    "hyperparameters": "bottom",
    "performance": "bottom",
}
#: Built-in panels per section, in display order (grad_norm moves to STEP SIZE, as in Cockpit).
_PLACEMENT: Mapping[str, tuple[str, ...]] = {
    "step": ("alpha", "distance", "update_size", "grad_norm"),
    "gradients": (
        "gradient_tests",
        "tests_history",
        "batch_size",
        "grad_hist_1d",
        "grad_hist_2d",
        "mean_gsnr",
        "early_stopping",
        "cabs",
    ),
    "curvature": ("hess_max_ev", "hess_trace", "tic_diag", "tic_trace"),
    "bottom": ("hyperparameters", "performance"),
    "time": ("grad_hist_time",),
    "layers": ("layer_grid",),
}
_WIDE = {
    "tests_history",
    "batch_size",
    "performance",
    "grad_hist_time",
    "layer_grid",
    "layer_hist_time",
}
_TALL = {
    "tests_history": 480,
    "batch_size": 480,
    "grad_hist_2d": 380,
    "layer_hist_2d": 380,
    "grad_hist_time": 380,
    "layer_hist_time": 340,
}
_TESTS = ("norm_test", "inner_test", "ortho_test")
#: Kinds that show one run (the focus run) rather than overlaying all selected runs.
SINGLE_RUN_KINDS = frozenset(
    {"alpha", "gradient_tests", "hist1d", "hist2d", "hist_time", "layer_grid"}
)

#: Panels of the per-layer section whose ``param`` is the parameter picked in the layer picker.
LAYER_PANELS: tuple[PanelSpec, ...] = (
    PanelSpec(
        "layer_grad_norm",
        "line",
        "grad_norm",
        "grad_norm",
        "Gradient norm",
        "layers",
        y_log=True,
        description="Norm of this tensor's mini-batch gradient.",
    ),
    PanelSpec(
        "layer_hist_1d",
        "hist1d",
        "grad_hist_1d",
        "grad_hist_1d",
        "Gradient histogram",
        "layers",
        y_log=True,
        description="Individual gradient entries of this tensor.",
    ),
    PanelSpec(
        "layer_hist_2d",
        "hist2d",
        "grad_hist_2d",
        "grad_hist_2d",
        "Gradient × parameter histogram",
        "layers",
        y_log=True,
        description="Parameter values against individual gradients of this tensor.",
    ),
    PanelSpec(
        "layer_hist_time",
        "hist_time",
        "grad_hist_1d",
        "grad_hist_1d",
        "Gradient histogram over time",
        "layers",
        y_log=True,
        description="This tensor's gradient histogram, one row per tracked step.",
    ),
)


@dataclass(frozen=True)
class Panel:
    """One dashboard panel: what it shows and where.

    Attributes:
        spec: The figure spec (see :func:`app.figures.build_panel`).
        section: Key of the section it is shown in (see :data:`SECTIONS`).
        layer: Whether ``spec.param`` comes from the layer picker.
        metrics: Only these metrics of ``spec.instrument`` are shown (``None``: all), e.g. the
            learning rate alone, as the hyperparameters instrument declares.

    Example:
        >>> from app.layout import panel_catalog
        >>> alpha = panel_catalog()[0]
        >>> alpha.name, alpha.section, alpha.spec.kind, alpha.wide, alpha.height
        ('alpha', 'step', 'alpha', False, 320)

    """

    spec: PanelSpec
    section: str
    layer: bool = False
    metrics: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        """The panel's unique name (used in component ids)."""
        return self.spec.name

    @property
    def wide(self) -> bool:
        """Whether the panel spans two grid columns."""
        return self.spec.name in _WIDE

    @property
    def height(self) -> int | None:
        """Graph height in pixels (``None``: the figure decides)."""
        if self.spec.kind == "layer_grid":
            return None
        return _TALL.get(self.spec.name, 320)


def panel_reads(spec: PanelSpec) -> tuple[tuple[str, str, str | None], ...]:
    """What a panel reads from the log: ``(table, instrument, param)``, ``param=None`` for all.

    Args:
        spec: The panel spec (with its ``param`` filled in for per-layer panels).

    Returns:
        The ``(table, instrument, param)`` triples.

    Example:
        >>> from app.figures import DEFAULT_PANELS
        >>> from app.layout import panel_reads
        >>> specs = {s.name: s for s in DEFAULT_PANELS}
        >>> panel_reads(specs["performance"])  # the loss and the user metrics
        (('scalars', 'loss', 'all'), ('scalars', 'user', 'all'))
        >>> panel_reads(specs["layer_grid"])  # histograms of every parameter
        (('histograms', 'grad_hist_2d', None),)

    """
    kind, inst, param = spec.kind, spec.instrument, spec.param
    if kind in ("gradient_tests", "tests_history"):
        return tuple(("scalars", t, "all") for t in _TESTS)
    if kind == "performance":
        return (("scalars", inst, "all"), ("scalars", "user", "all"))
    if kind == "batch_size":
        return (("scalars", inst, "all"), ("scalars", "hyperparameters", "all"))
    if kind == "hyperparameters":
        return (("scalars", inst, None),)
    if kind in ("hist1d", "hist2d"):
        # The model-wide histogram falls back to the sum of the per-layer ones.
        return (("histograms", inst, None if param == "all" else param),)
    if kind == "hist_time":
        return (("histograms", inst, param),)
    if kind == "layer_grid":
        return (("histograms", inst, None),)
    if kind in ("line", "alpha"):
        return (("scalars", inst, param),)
    return (("scalars", inst, None), ("histograms", inst, None))


def panel_tracks(spec: PanelSpec) -> frozenset[str]:
    """The instruments whose configuration decides between "no data yet" and "not tracked".

    Args:
        spec: The panel spec.

    Returns:
        Instrument names.

    Example:
        >>> from app.figures import DEFAULT_PANELS
        >>> from app.layout import panel_tracks
        >>> specs = {s.name: s for s in DEFAULT_PANELS}
        >>> sorted(panel_tracks(specs["gradient_tests"])), sorted(panel_tracks(specs["alpha"]))
        (['inner_test', 'norm_test', 'ortho_test'], ['alpha'])

    """
    if spec.kind in ("gradient_tests", "tests_history"):
        return frozenset(_TESTS)
    return frozenset({spec.instrument})


def _derived(name: str, declared: Any) -> list[PanelSpec]:
    """Line panels from an instrument's own ``panel`` declaration (one per declared metric)."""
    metrics = tuple(getattr(declared, "metrics", ()) or ()) or (name,)
    specs = []
    for metric in metrics:
        several = len(metrics) > 1
        specs.append(
            PanelSpec(
                name=f"{name}.{metric}" if several else name,
                kind="line",
                instrument=name,
                metric=metric,
                title=f"{declared.title} · {metric}" if several else str(declared.title),
                group=str(getattr(declared, "group", "")),
                y_log=bool(getattr(declared, "y_log", False)),
                description=str(getattr(declared, "description", "")),
            )
        )
    return specs


def panel_catalog(instruments: Mapping[str, type] | None = None) -> list[Panel]:
    """All panels of the dashboard, in display order.

    Args:
        instruments: ``{log name: instrument class}``; defaults to the registry
            :data:`instruments.INSTRUMENTS`. Instruments that no built-in panel reads get
            derived line panels.

    Returns:
        The panels, section by section.

    Example:
        An instrument's ``panel`` declaration is all a new panel needs:

        >>> from app.layout import panel_catalog
        >>> from instruments import PanelSpec
        >>> class Sharpness:  # e.g. an Instrument subclass
        ...     panel = PanelSpec("line", "curvature", "Sharpness", y_log=True)
        >>> panels = panel_catalog({"sharpness": Sharpness})
        >>> [(p.name, p.section, p.spec.kind) for p in panels if p.spec.instrument == "sharpness"]
        [('sharpness', 'curvature', 'line')]
        >>> [p.name for p in panels][:4]  # the built-ins come first, section by section
        ['alpha', 'distance', 'update_size', 'grad_norm']

    """
    if instruments is None:
        import cockpit  # noqa: F401  (imports the instrument registry in a working order)
        from instruments import INSTRUMENTS

        instruments = INSTRUMENTS
    by_name = {spec.name: spec for spec in DEFAULT_PANELS}
    placed: dict[str, list[Panel]] = {key: [] for key, _, _ in SECTIONS}
    used: set[str] = set()

    def builtin(spec: PanelSpec, section: str) -> Panel:
        declared = getattr(instruments.get(spec.instrument), "panel", None)
        metrics = None
        if spec.kind == "hyperparameters" and getattr(declared, "metrics", None):
            metrics = tuple(declared.metrics)
        return Panel(spec, section, metrics=metrics)

    for section, names in _PLACEMENT.items():
        for name in names:
            if name in by_name:
                placed[section].append(builtin(by_name[name], section))
                used.add(name)
    for spec in DEFAULT_PANELS:  # built-ins not placed above go by their group
        if spec.name not in used:
            placed[_SECTION_OF_GROUP.get(spec.group, "other")].append(builtin(spec, "other"))
    placed["layers"] += [Panel(spec, "layers", layer=True) for spec in LAYER_PANELS]
    covered = {inst for spec in DEFAULT_PANELS for _, inst, _ in panel_reads(spec)}
    for name, cls in instruments.items():
        declared = getattr(cls, "panel", None)
        if declared is None or name in covered:
            continue
        for spec in _derived(name, declared):
            section = _SECTION_OF_GROUP.get(spec.group, "other")
            placed[section].append(Panel(spec, section))
    panels = []
    for key, _, _ in SECTIONS:
        panels += [dataclasses.replace(p, section=key) for p in placed[key]]
    return panels


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------
_GRAPH_CONFIG = {
    "displaylogo": False,
    "displayModeBar": "hover",
    "responsive": True,
    "modeBarButtonsToRemove": ["lasso2d", "select2d", "toImage"],
}


def _card(panel: Panel) -> html.Div:
    spec = panel.spec
    name = panel.name
    style = {} if panel.height is None else {"height": f"{panel.height}px"}
    return html.Div(
        className="cp-card cp-wide" if panel.wide else "cp-card",
        id={"type": "card", "name": name},
        children=[
            html.Div(
                className="cp-card-head",
                children=[
                    html.Span(spec.description, className="cp-card-desc", title=spec.description),
                    html.Div(
                        className="cp-card-tools",
                        children=[
                            dcc.Checklist(
                                id={"type": "log", "name": name},
                                options=[{"label": " log", "value": "log"}],
                                value=["log"] if spec.y_log else [],
                                className="cp-log",
                                inline=True,
                            ),
                            html.Button(
                                "CSV",
                                id={"type": "csv", "name": name},
                                className="cp-csv",
                                title="Download what this panel shows as CSV",
                                n_clicks=0,
                            ),
                            dcc.Store(id={"type": "csvdata", "name": name}),
                            dcc.Download(id={"type": "download", "name": name}),
                        ],
                    ),
                ],
            ),
            dcc.Graph(
                id={"type": "panel", "name": name},
                config=_GRAPH_CONFIG,
                style=style,
                className="cp-graph",
            ),
        ],
    )


def _control(label: str, component: Any, width: str | None = None) -> html.Div:
    return html.Div(
        className="cp-control",
        style={"flex": f"0 1 {width}"} if width else None,
        children=[html.Label(label, className="cp-control-label"), component],
    )


def build_layout(
    panels: Sequence[Panel],
    root: str,
    refresh_ms: int,
    run_options: Sequence[Mapping[str, str]] = (),
) -> html.Div:
    """The page: header, controls, hints, then one card per panel, section by section.

    Args:
        panels: From :func:`panel_catalog`.
        root: The log root, shown in the header.
        refresh_ms: Interval between live updates.
        run_options: Initial options of the run selector.

    Returns:
        The layout tree.

    Example:
        >>> from app.layout import build_layout, panel_catalog
        >>> def ids(component):  # every component id in the tree
        ...     own = [component.id] if getattr(component, "id", None) is not None else []
        ...     kids = getattr(component, "children", None)
        ...     kids = kids if isinstance(kids, list) else [] if kids is None else [kids]
        ...     return own + [i for kid in kids for i in ids(kid)]
        >>> panels = panel_catalog()
        >>> page = build_layout(panels, "runs", 2000, [{"label": "sgd", "value": "sgd"}])
        >>> found = ids(page)
        >>> all(i in found for i in ["tick", "state", "runs", "smoothing"])  # interval, store, ...
        True
        >>> sum(1 for i in found if isinstance(i, dict) and i["type"] == "panel") == len(panels)
        True

    """
    sections = []
    for key, title, subtitle in SECTIONS:
        cards = [_card(p) for p in panels if p.section == key]
        if not cards:
            continue
        extra = []
        if key == "layers":
            extra = [
                _control(
                    "Parameter tensor",
                    dcc.Dropdown(id="layer", placeholder="pick a parameter", clearable=False),
                    "360px",
                )
            ]
        sections.append(
            html.Section(
                className="cp-section",
                id=f"section-{key}",
                children=[
                    html.Div(
                        className="cp-section-head",
                        children=[html.H2(title), html.Span(subtitle, className="cp-sub"), *extra],
                    ),
                    html.Div(className="cp-grid", children=cards),
                ],
            )
        )
    return html.Div(
        className="cp-app",
        children=[
            dcc.Location(id="url", refresh=False),
            dcc.Interval(id="tick", interval=int(refresh_ms), n_intervals=0),
            dcc.Store(id="pulse", storage_type="memory"),
            dcc.Store(id="state", storage_type="memory"),
            html.Header(
                className="cp-header",
                children=[
                    html.Div(
                        className="cp-brand",
                        children=[
                            html.Span("cockpit", className="cp-logo"),
                            html.Span("live", className="cp-logo-live"),
                            html.Span(root, className="cp-root", title="log root"),
                        ],
                    ),
                    html.Div(id="status", className="cp-status"),
                ],
            ),
            html.Div(
                className="cp-controls",
                children=[
                    _control(
                        "Runs",
                        dcc.Dropdown(
                            id="runs",
                            options=list(run_options),
                            multi=True,
                            placeholder="select runs to show and compare",
                        ),
                        "520px",
                    ),
                    _control(
                        "Gauges & histograms of",
                        dcc.RadioItems(id="focus", options=[], inline=True, className="cp-radio"),
                        "260px",
                    ),
                    _control(
                        "Smoothing (EMA)",
                        dcc.Slider(
                            id="smoothing",
                            min=0.0,
                            max=0.99,
                            step=0.01,
                            value=0.6,
                            marks={0: "0", 0.5: "0.5", 0.9: "0.9", 0.99: "0.99"},
                            updatemode="mouseup",
                        ),
                        "300px",
                    ),
                    _control(
                        "x axis",
                        dcc.RadioItems(
                            id="xaxis",
                            options=[
                                {"label": " step", "value": "step"},
                                {"label": " wall time", "value": "wall_time"},
                            ],
                            value="step",
                            inline=True,
                            className="cp-radio",
                        ),
                        "180px",
                    ),
                    _control(
                        "Updates",
                        dcc.Checklist(
                            id="live",
                            options=[{"label": " live", "value": "live"}],
                            value=["live"],
                            inline=True,
                            className="cp-live",
                        ),
                        "90px",
                    ),
                ],
            ),
            html.Div(id="notice", className="cp-notice"),
            html.Div(
                className="cp-hints",
                children=[html.H2("Hints"), html.Div(id="hints", className="cp-hint-list")],
            ),
            *sections,
            html.Footer(
                className="cp-footer",
                children="Drag to zoom (kept across updates), double-click to reset. "
                "Faint lines: raw values; solid: debiased EMA.",
            ),
        ],
    )


#: Page CSS (embedded: the app ships no asset files).
CSS = """
:root { --cp-bg: #f3f5f9; --cp-card: #ffffff; --cp-ink: #1f2a3d; --cp-mute: #6b7a90;
        --cp-line: #e3e8f0; --cp-accent: #1f77b4; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--cp-bg); color: var(--cp-ink);
       font: 14px/1.4 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.cp-app { max-width: 1680px; margin: 0 auto; padding: 0 20px 24px; }
.cp-header { display: flex; align-items: center; justify-content: space-between; gap: 16px;
             padding: 14px 0 10px; border-bottom: 1px solid var(--cp-line); }
.cp-brand { display: flex; align-items: baseline; gap: 8px; min-width: 0; }
.cp-logo { font-weight: 700; font-size: 22px; letter-spacing: .5px; }
.cp-logo-live { font-weight: 700; font-size: 13px; color: #fff; background: #d62728;
                border-radius: 4px; padding: 1px 6px; position: relative; top: -2px; }
.cp-root { color: var(--cp-mute); font-family: ui-monospace, Menlo, Consolas, monospace;
           font-size: 12px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.cp-status { display: flex; flex-wrap: wrap; gap: 6px 14px; justify-content: flex-end;
             font-size: 13px; }
.cp-run { display: inline-flex; align-items: center; gap: 6px; white-space: nowrap; }
.cp-dot { width: 10px; height: 10px; border-radius: 50%; display: inline-block; }
.cp-badge { font-size: 11px; border-radius: 8px; padding: 0 6px; background: #e9eef5;
            color: var(--cp-mute); }
.cp-badge.live { background: #e3f5e6; color: #1b7a2f; }
.cp-badge.crashed { background: #fde8e8; color: #b42318; }
.cp-controls { display: flex; flex-wrap: wrap; gap: 12px 24px; align-items: flex-end;
               padding: 12px 0; }
.cp-control { display: flex; flex-direction: column; gap: 4px; min-width: 0; }
.cp-control-label { font-size: 11px; text-transform: uppercase; letter-spacing: .6px;
                    color: var(--cp-mute); font-weight: 600; }
.cp-radio label, .cp-live label, .cp-log label { margin-right: 10px; cursor: pointer; }
.cp-notice:empty { display: none; }
.cp-notice { background: #fff7e6; border: 1px solid #f5d48a; border-radius: 8px;
             padding: 8px 12px; margin: 4px 0 8px; }
.cp-notice div + div { margin-top: 4px; }
.cp-hints { background: var(--cp-card); border: 1px solid var(--cp-line); border-radius: 10px;
            padding: 10px 14px; margin: 8px 0 4px; }
.cp-hints h2 { margin: 0 0 6px; font-size: 12px; text-transform: uppercase;
               letter-spacing: .8px; color: var(--cp-mute); }
.cp-hint { padding: 3px 0 3px 10px; border-left: 3px solid #9db8d9; margin: 4px 0; }
.cp-hint.warning { border-left-color: #e8a33d; }
.cp-hint-empty { color: var(--cp-mute); }
.cp-hint-tag { font-size: 11px; color: var(--cp-mute); margin-right: 6px;
               font-family: ui-monospace, Menlo, Consolas, monospace; }
.cp-section { margin-top: 18px; }
.cp-section-head { display: flex; align-items: center; flex-wrap: wrap; gap: 6px 14px;
                   margin: 0 0 8px; }
.cp-section-head h2 { margin: 0; font-size: 15px; text-transform: uppercase;
                      letter-spacing: 1.2px; }
.cp-sub { color: var(--cp-mute); font-size: 13px; flex: 1 1 auto; }
.cp-section-head .cp-control { flex-direction: row; align-items: center; gap: 8px; }
.cp-section-head .cp-control > div { min-width: 260px; }
.cp-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr));
           gap: 12px; }
.cp-card { background: var(--cp-card); border: 1px solid var(--cp-line); border-radius: 10px;
           padding: 8px 10px 4px; min-width: 0; box-shadow: 0 1px 2px rgba(16,24,40,.04); }
.cp-wide { grid-column: span 2; }
.cp-compact .cp-graph { height: 110px !important; }
.cp-compact .cp-card-desc, .cp-compact .cp-log { visibility: hidden; }
@media (max-width: 900px) { .cp-wide { grid-column: span 1; } }
.cp-card-head { display: flex; align-items: center; justify-content: space-between; gap: 8px; }
.cp-card-tools { display: flex; align-items: center; gap: 8px; font-size: 12px;
                 color: var(--cp-mute); }
.cp-card-desc { color: var(--cp-mute); font-size: 12px; overflow: hidden; white-space: nowrap;
                text-overflow: ellipsis; min-width: 0; }
.cp-csv { font-size: 11px; border: 1px solid var(--cp-line); background: #f8fafc;
          border-radius: 5px; padding: 1px 7px; cursor: pointer; color: var(--cp-ink); }
.cp-csv:hover { background: #eef3f9; }
.cp-footer { color: var(--cp-mute); font-size: 12px; margin-top: 18px; text-align: center; }
"""
