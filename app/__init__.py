"""The live Dash dashboard for cockpit logs.

``create_app(root)`` returns the Dash app (embed it, or serve ``app.server`` with any WSGI
server); ``serve(root)`` runs it on 127.0.0.1 with debug mode off. Both serve only the runs
directly under ``root`` (see :func:`app.data.resolve_run`).

The app also answers two small JSON routes: ``/api/runs`` (the run list) and
``/api/runs/<run id>`` (a run's status and metadata; 404 for anything that is not a run
directly under the root).

Module map: :mod:`app.data` (discovery, path safety, the shared incremental cache),
:mod:`app.layout` (panel catalog and components), :mod:`app.callbacks` (the update logic),
:mod:`app.figures`/:mod:`app.transforms`/:mod:`app.hints` (pure, Dash-free builders).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
from collections.abc import Mapping
from typing import Any

__all__ = ["create_app", "serve"]

_log = logging.getLogger(__name__)

_INDEX = """<!DOCTYPE html>
<html>
    <head>
        {%metas%}
        <title>{%title%}</title>
        {%favicon%}
        {%css%}
        <style>__CSS__</style>
    </head>
    <body>
        {%app_entry%}
        <footer>
            {%config%}
            {%scripts%}
            {%renderer%}
        </footer>
    </body>
</html>"""


def _register_api(server: Any, cache: Any) -> None:
    from flask import abort, jsonify, request

    from app.data import RunNotFound, resolve_run
    from cockpit.logreader import run_status

    def _num(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    @server.before_request
    def api_only_known_routes() -> None:
        # Dash answers any unknown path with its index page; under /api/ that would hide a 404
        # (e.g. "/api/runs//etc", which no run route matches).
        if request.path.startswith("/api/") and request.endpoint not in ("api_runs", "api_run"):
            abort(404)

    @server.route("/api/runs")
    def api_runs():  # noqa: ANN202 - Flask view
        return jsonify(
            [
                {"run_id": r.run_id, "status": r.status, "start_time": _num(r.start_time)}
                for r in cache.list_runs()
            ]
        )

    @server.route("/api/runs/<path:run_id>")
    def api_run(run_id: str):  # noqa: ANN202 - Flask view
        try:
            path = resolve_run(cache.root, run_id)
        except RunNotFound:
            abort(404)
        meta = cache.meta(run_id)
        return jsonify(
            {
                "run_id": run_id,
                "status": run_status(path),
                "start_time": _num(meta.get("start_time")),
                "instruments": [
                    i.get("name") for i in meta.get("instruments", []) if isinstance(i, dict)
                ],
                "tags": meta.get("tags", {}),
            }
        )


def _prewarm(cache: Any) -> None:
    """Read the newest run in the background, so the first page load finds it cached."""

    def work() -> None:
        try:
            runs = cache.list_runs()
            if runs:
                cache.get(runs[-1].run_id)
        except Exception:  # noqa: BLE001 - best effort; the page reads it on demand
            _log.debug("prewarming the run cache failed", exc_info=True)

    threading.Thread(target=work, name="cockpit-prewarm", daemon=True).start()


def create_app(
    root: str | os.PathLike,
    refresh_s: float = 2.0,
    *,
    instruments: Mapping[str, type] | None = None,
    cache_bytes: int = 1 << 30,
    prewarm: bool = True,
    snapshot_s: float = 3.0,
) -> Any:
    """Build the dashboard for the runs under ``root``.

    Args:
        root: The log root (a directory of run directories); it may be empty.
        refresh_s: Seconds between live updates of each open page.
        instruments: ``{log name: instrument class}`` whose ``panel`` declarations add panels;
            defaults to the registry :data:`instruments.INSTRUMENTS`.
        cache_bytes: Bound on the rows the server keeps in memory (shared by all clients).
        prewarm: Read the newest run in a background thread right away.
        snapshot_s: Gauges and latest-histogram panels are rebuilt at most this often (line
            and heatmap-over-time panels grow on every refresh).

    Returns:
        The ``dash.Dash`` app (its Flask server is ``app.server``).

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is not a directory.
        ValueError: If ``refresh_s`` is not positive.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from app import create_app
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with LogWriter(Path(tmp.name) / "sgd", {"tags": {"lr": 0.1}}) as writer:
        ...     writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> dash_app = create_app(tmp.name, refresh_s=1.0, prewarm=False)
        >>> client = dash_app.server.test_client()  # or serve dash_app.server with any WSGI server
        >>> [(r["run_id"], r["status"]) for r in client.get("/api/runs").get_json()]
        [('sgd', 'finished')]
        >>> client.get("/api/runs/sgd").get_json()["tags"]
        {'lr': 0.1}
        >>> client.get("/api/runs/..%2Fetc").status_code  # only runs directly under the root
        404
        >>> tmp.cleanup()

    """
    from dash import Dash

    from app.callbacks import needed_reads, register_callbacks
    from app.data import LogCache
    from app.figures import warm_up
    from app.layout import CSS, build_layout, panel_catalog

    if not (isinstance(refresh_s, (int, float)) and math.isfinite(refresh_s) and refresh_s > 0):
        raise ValueError(f"refresh_s must be a positive number of seconds, got {refresh_s!r}")
    panels = panel_catalog(instruments)
    cache = LogCache(root, max_bytes=cache_bytes, keep=needed_reads(panels))
    app = Dash(
        __name__,
        title="cockpit-live",
        update_title=None,
        serve_locally=True,
        assets_ignore=".*",
    )
    app.index_string = _INDEX.replace("__CSS__", CSS)
    refresh_ms = max(100, int(round(refresh_s * 1000)))

    def layout() -> Any:
        options = [
            {"label": f"{r.run_id} · {r.status}", "value": r.run_id} for r in cache.list_runs()
        ]
        return build_layout(panels, str(cache.root), refresh_ms, options)

    app.layout = layout
    register_callbacks(app, cache, panels, snapshot_s=snapshot_s)
    _register_api(app.server, cache)
    app.server.extensions["cockpit_cache"] = cache
    warm_up()  # Plotly's validators load now, not in the first request
    if prewarm:
        _prewarm(cache)
    return app


def serve(
    root: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8050,
    refresh_s: float = 2.0,
) -> int:
    """Serve the dashboard until interrupted (debug mode off).

    Args:
        root: The log root.
        host: Interface to bind; the default serves this machine only.
        port: TCP port.
        refresh_s: Seconds between live updates.

    Returns:
        0 when the server stops.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is not a directory.

    Example:
        Serving blocks until interrupted; with ``Dash.run`` stubbed out, the call it makes:

        >>> import tempfile
        >>> from unittest import mock
        >>> from app import serve
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with mock.patch("dash.Dash.run") as run:
        ...     serve(tmp.name, port=8051)
        0
        >>> run.call_args.kwargs  # this machine only, debug mode off
        {'host': '127.0.0.1', 'port': 8051, 'debug': False}
        >>> tmp.cleanup()

    """
    app = create_app(root, refresh_s)
    # What start-up built (modules, layout, Plotly's validators) lives as long as the server:
    # keep it out of the collector's full passes, which otherwise cost ~0.1 s in a request.
    gc.freeze()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    _log.info("cockpit dashboard for %s on http://%s:%d/", os.fspath(root), host, port)
    app.run(host=host, port=port, debug=False)
    return 0
