"""Fixtures of the dashboard tests: real logs, a real server, a real headless Chromium.

Nothing here is a stand-in: logs are written by :class:`cockpit.logwriter.LogWriter` (or a
real Cockpit in a subprocess), the app is the real Dash/Flask app served over HTTP on a free
loopback port, and the browser is Debian's Chromium driven through chromedriver.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = Path(__file__).with_name("_train_for_dashboard.py")
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias")


# --------------------------------------------------------------------------------------------
# Logs written with the real LogWriter
# --------------------------------------------------------------------------------------------
def write_steps(
    writer: Any,
    steps: Sequence[int],
    hist_every: int = 5,
    instruments: Sequence[str] = ("loss", "grad_norm", "alpha"),
) -> None:
    """Rows like a Cockpit run: loss, grad norm (model-wide and per tensor), alpha, histograms."""
    rng = np.random.default_rng(int(steps[0]) if len(steps) else 0)
    e1, eg, ep = np.linspace(-2, 2, 21), np.linspace(-1, 1, 9), np.linspace(-2, 2, 11)
    for s in steps:
        rows = []
        if "loss" in instruments:
            rows.append(("loss", "loss", "all", math.exp(-s / 50) + 0.01 * rng.random()))
        if "grad_norm" in instruments:
            rows.append(("grad_norm", "grad_norm", "all", 1.0 + s))
            rows += [("grad_norm", "grad_norm", p, 0.5 + s) for p in PARAMS]
        if "alpha" in instruments:
            rows.append(("alpha", "alpha", "all", float(rng.normal(0.0, 0.3))))
        for inst in instruments:
            if inst not in ("loss", "grad_norm", "alpha"):
                rows.append((inst, inst, "all", float(s)))
        writer.add_scalars(s, rows, wall_time=1.7e9 + s)
        if hist_every and s % hist_every == 0:
            for p in ("all", *PARAMS):
                writer.add_histogram(s, "grad_hist_1d", p, rng.random(20) * 10, [e1])
                writer.add_histogram(s, "grad_hist_2d", p, rng.random((8, 10)), [eg, ep])


def metadata(instruments: Sequence[str] = ("loss", "grad_norm", "alpha", "grad_hist_1d")):
    """Run metadata naming the tracked instruments and the model's tensors."""
    return {
        "instruments": [{"name": n, "schedule": "every(1)", "config": {}} for n in instruments],
        "model": [{"name": p, "shape": [1], "numel": 1, "requires_grad": True} for p in PARAMS],
    }


# --------------------------------------------------------------------------------------------
# Driving the app's callbacks over HTTP, the way the Dash renderer does
# --------------------------------------------------------------------------------------------
def _ids(node: Any, out: list) -> list:
    """``(id, props)`` of every component of a serialized layout."""
    if isinstance(node, dict):
        if "props" in node:
            ident = node["props"].get("id")
            if ident is not None:
                out.append((ident, node["props"]))
            _ids(node["props"].get("children"), out)
        else:
            for value in node.values():
                _ids(value, out)
    elif isinstance(node, list):
        for value in node:
            _ids(value, out)
    return out


class DashSession:
    """One simulated page: builds the main callback's request bodies from the served layout.

    Args:
        get: ``path -> JSON`` for GET requests.
        post: ``(path, JSON body) -> (status, JSON or None)``.
    """

    def __init__(self, get: Callable[[str], Any], post: Callable[[str, Any], tuple[int, Any]]):
        self._post = post
        deps = get("/_dash-dependencies")
        self.main_output = next(d["output"] for d in deps if "extendData" in d["output"])
        ids = _ids(get("/_dash-layout"), [])
        self.panels = [i["name"] for i, _ in ids if isinstance(i, dict) and i["type"] == "panel"]
        #: The log toggles as the page starts (``["log"]`` where the panel defaults to log).
        self.default_logs = {
            i["name"]: "log" in (props.get("value") or [])
            for i, props in ids
            if isinstance(i, dict) and i.get("type") == "log"
        }
        self.state: Any = None
        self.ticks = 0

    def update(
        self,
        trigger: str,
        runs: Sequence[str] = (),
        focus: str | None = None,
        smoothing: float = 0.0,
        x: str = "step",
        layer: str | None = None,
        logs: Mapping[str, bool] | None = None,
    ) -> dict[str, Any]:
        """POST one main-callback request; keeps the returned state like the browser does.

        Returns:
            ``{"figure": {name: fig}, "extendData": {name: payload}, "className": {...},
            "state": ..., "hints": ..., "status": ..., "http": status}``.
        """
        logs = {**self.default_logs, **(logs or {})}
        if trigger == "tick":
            self.ticks += 1
        panels = self.panels

        def many(kind: str, prop: str) -> list:
            return [{"id": {"name": n, "type": kind}, "property": prop} for n in panels]

        body = {
            "output": self.main_output,
            "outputs": [
                many("panel", "figure"),
                many("panel", "extendData"),
                many("card", "className"),
                {"id": "state", "property": "data"},
                {"id": "hints", "property": "children"},
                {"id": "status", "property": "children"},
            ],
            "inputs": [
                {"id": "pulse", "property": "data", "value": self.ticks},
                {"id": "runs", "property": "value", "value": list(runs)},
                {"id": "focus", "property": "value", "value": focus},
                {"id": "smoothing", "property": "value", "value": smoothing},
                {"id": "xaxis", "property": "value", "value": x},
                {"id": "layer", "property": "value", "value": layer},
                [
                    {
                        "id": {"name": n, "type": "log"},
                        "property": "value",
                        "value": ["log"] if logs.get(n) else [],
                    }
                    for n in panels
                ],
            ],
            "state": [{"id": "state", "property": "data", "value": self.state}],
            "changedPropIds": ["pulse.data" if trigger == "tick" else trigger],
        }
        status, answer = self._post("/_dash-update-component", body)
        out: dict[str, Any] = {"figure": {}, "extendData": {}, "className": {}, "http": status}
        for key, props in ((answer or {}).get("response") or {}).items():
            if key.startswith("{"):
                name = json.loads(key)["name"]
                for prop, value in props.items():
                    out[prop][name] = value
            else:
                for value in props.values():
                    out[key] = value
        if "state" in out:
            self.state = out["state"]
        return out


def flask_session(app: Any) -> DashSession:
    """A :class:`DashSession` over Flask's test client (real WSGI requests, no socket)."""
    client = app.server.test_client()

    def get(path: str) -> Any:
        return client.get(path).get_json()

    def post(path: str, body: Any) -> tuple[int, Any]:
        response = client.post(path, json=body)
        return response.status_code, response.get_json(silent=True)

    return DashSession(get, post)


# --------------------------------------------------------------------------------------------
# A served app
# --------------------------------------------------------------------------------------------
class Server:
    """The app served by Werkzeug's threaded server on a free loopback port (in a thread)."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self._server = make_server("127.0.0.1", 0, app.server, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)


@pytest.fixture
def serve_app() -> Iterator[Callable[..., Server]]:
    """Factory: ``serve_app(root, **create_app_kwargs)`` -> running :class:`Server`."""
    from app import create_app

    servers: list[Server] = []

    def start(root: Any, **kwargs: Any) -> Server:
        server = Server(create_app(root, **kwargs))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# --------------------------------------------------------------------------------------------
# Training processes with a real Cockpit
# --------------------------------------------------------------------------------------------
class Trainer:
    """A ``_train_for_dashboard.py`` subprocess (we started it, we stop it by its pid)."""

    def __init__(self, root: Path, run: str, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, str(TRAIN_SCRIPT), str(root), run, *args],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# --------------------------------------------------------------------------------------------
# Chromium
# --------------------------------------------------------------------------------------------
def require_chromium() -> None:
    """Fail (never skip) when the browser is missing: CI installs it with ``make test``."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"browser tests need Debian's chromium and chromium-driver ({', '.join(missing)} "
            "missing): run `make test`, or `apt-get update && apt-get install -y "
            "--no-install-recommends chromium chromium-driver`",
            pytrace=False,
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("browser tests need selenium: pip install -e '.[test]'", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A fresh headless Chromium (own profile directory) with browser console logging."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cockpit-chromium-")
    downloads = tempfile.mkdtemp(prefix="cockpit-downloads-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1600,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option(
        "prefs", {"download.default_directory": downloads, "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.downloads = Path(downloads)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(downloads, ignore_errors=True)
