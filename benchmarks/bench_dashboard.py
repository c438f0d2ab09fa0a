"""Dashboard benchmark: page load and refresh cost (server time) on a 10⁵-step full-preset run.

Run ``python -m benchmarks.bench_dashboard [--steps 100000] [--clients 20] [--duration 30]
[--cold-runs 5] [--rev HEAD] [--compare REV]``. It prints a Markdown table and writes
``results/dashboard.{md,json}`` (``--out DIR``; ``--out -`` prints only). Targets: page load
< 2 s and a refresh < 300 ms (one client), and refreshes < 1 s while 20 clients refresh every
2 s.

Code measured. ``--rev`` (default ``HEAD``) is measured from a ``git archive`` snapshot, so
edits in the working tree cannot change it (commit before benchmarking; ``--rev worktree``
measures the working tree). ``--compare REV`` also times the cold page loads of another commit
on the same run, interleaved with the measured ones, so both see the same machine load.

Workload. One run written with the real :class:`~cockpit.logwriter.LogWriter` (default
batching and background compaction) at the row counts of a real Cockpit with the ``full``
preset on a 3-layer MLP (6 parameter tensors; the rows are those a real economy run logs,
see ``tests/app/_train_for_dashboard.py``, plus the curvature instruments):

* every step: loss, accuracy (user metric), alpha, and for grad_norm, distance, update_size
  and the norm/inner/ortho tests the model-wide value plus one per tensor, the three batch
  size suggestions, four hyperparameter rows: 52 rows;
* every ``--curv-every`` (10) steps: tic_diag, hess_trace, hess_max_ev;
* every ``--hist-every`` (100) steps: grad_hist_1d (100 bins) and grad_hist_2d (40 × 50),
  model-wide and per tensor (14 histograms).

Method. The app runs in its own process (``serve`` sub-command: ``create_app`` with
``prewarm=False`` and then ``gc.freeze()`` as :func:`app.serve` does, behind a WSGI middleware
that adds a ``Server-Timing`` header to every response, served by Werkzeug's threaded server on
a loopback port). Clients replay the requests the Dash renderer makes — index, layout,
dependencies, then the callback chain URL → run selection → focus → layer (the first read of
the run happens here) → main callback (full build) — and then the main callback on every
interval tick with the state the previous answer returned. *Server time* is the sum of the
``Server-Timing`` durations of a page load's requests, or the duration of one tick request.

* *Cold*: the first page load after a server process started: nothing of the run has been
  read, no figure built (the Parquet files are in the OS page cache, as right after training).
  Each of ``--cold-runs`` starts is a new process; reported: median (min–max), the server
  process's CPU time during that load (user + system of all its threads, from ``/proc``; less
  disturbed by other processes on a shared machine than elapsed time), and the time from
  spawning the process to its first answer (imports and ``create_app``).
* *Warm*: later loads (the run is in the server's shared cache), each with a view no client
  has seen, so every figure is built; *shared*: a view an earlier client had (figures shared).
* *Refresh*: while a writer appends steps (≈ 25 steps/s, full preset rows) so every tick has
  new rows to send, one client and then ``--clients`` clients tick every ``--interval`` s.

With ``--compare``, the warm loads and refreshes of the baseline are measured after those of
the measured code, on the same (by then slightly longer) run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
RUN = "full-1e5"
INSTRUMENTS = (
    "alpha",
    "distance",
    "grad_hist_1d",
    "grad_norm",
    "inner_test",
    "loss",
    "norm_test",
    "ortho_test",
    "update_size",
    "tic_diag",
    "hess_trace",
    "hess_max_ev",
    "grad_hist_2d",
    "batch_size",
    "hyperparameters",
)


# --------------------------------------------------------------------------------------------
# The synthetic run
# --------------------------------------------------------------------------------------------
class RunWriter:
    """Writes full-preset rows step by step through a real LogWriter."""

    def __init__(self, run_dir: Path, curv_every: int = 10, hist_every: int = 100) -> None:
        from cockpit.logwriter import LogWriter

        meta = {
            "instruments": [{"name": n, "schedule": "every(1)", "config": {}} for n in INSTRUMENTS],
            "model": [{"name": p, "shape": [1], "numel": 1, "requires_grad": True} for p in PARAMS],
            "tags": {"benchmark": "dashboard"},
        }
        self.writer = LogWriter(run_dir, meta)
        self.curv_every, self.hist_every = curv_every, hist_every
        self.rng = np.random.default_rng(0)
        self.e1 = np.linspace(-2.0, 2.0, 101)
        self.eg, self.ep = np.linspace(-1.0, 1.0, 41), np.linspace(-2.0, 2.0, 51)
        self.scalar_rows = self.hist_rows = 0
        self.next_step = 0

    def write(self, n: int) -> None:
        """Append ``n`` steps."""
        w, rng = self.writer, self.rng
        for step in range(self.next_step, self.next_step + n):
            r = rng.random(16)
            decay = math.exp(-step / 3e4)
            rows = [
                ("loss", "loss", "all", decay + 0.1 * r[0]),
                ("user", "accuracy", "all", 1.0 - 0.9 * decay + 0.05 * r[1]),
            ]
            for k, inst in enumerate(
                ("grad_norm", "distance", "update_size", "norm_test", "inner_test", "ortho_test")
            ):
                base = (1.0 + r[2 + k]) * (decay if inst != "distance" else 1.0 - decay)
                rows.append((inst, inst, "all", base))
                rows += [(inst, inst, p, base * (0.3 + 0.1 * j)) for j, p in enumerate(PARAMS)]
            if step:
                rows.append(("alpha", "alpha", "all", float(rng.normal(0.0, 0.5))))
            rows += [
                ("batch_size", t, "all", 64.0 * (1.0 + r[8 + i]))
                for i, t in enumerate(("norm_test", "inner_test", "ortho_test"))
            ]
            rows += [
                ("hyperparameters", "batch_size", "all", 64.0),
                ("hyperparameters", "lr", "group0", 0.1 * decay),
                ("hyperparameters", "momentum", "group0", 0.9),
                ("hyperparameters", "weight_decay", "group0", 5e-4),
            ]
            if step % self.curv_every == 0:
                rows += [
                    ("tic_diag", "tic_diag", "all", float(r[11])),
                    ("hess_trace", "hess_trace", "all", 10.0 * r[12]),
                    ("hess_max_ev", "hess_max_ev", "all", 5.0 * r[13]),
                ]
            w.add_scalars(step, rows)
            self.scalar_rows += len(rows)
            if step % self.hist_every == 0:
                for p in ("all", *PARAMS):
                    w.add_histogram(step, "grad_hist_1d", p, rng.random(100) * 1e3, [self.e1])
                    w.add_histogram(
                        step, "grad_hist_2d", p, rng.random((40, 50)) * 1e2, [self.eg, self.ep]
                    )
                    self.hist_rows += 2
        self.next_step += n

    def close(self) -> None:
        self.writer.close()


def _segment_files(run_dir: Path) -> int:
    return sum(len(list((run_dir / t).glob("part-*.parquet"))) for t in ("scalars", "histograms"))


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------
class ServerTiming:
    """WSGI middleware: adds ``Server-Timing: app;dur=<ms>`` (the app's time for the response)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: Any) -> Iterable[bytes]:
        started = time.perf_counter()
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list, exc_info: Any = None) -> Any:
            captured.update(status=status, headers=headers, exc_info=exc_info)
            return lambda data: None

        iterable = self.app(environ, capture)
        try:
            body = b"".join(iterable)
        finally:
            if hasattr(iterable, "close"):
                iterable.close()
        ms = 1000.0 * (time.perf_counter() - started)
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        headers += [("Content-Length", str(len(body))), ("Server-Timing", f"app;dur={ms:.3f}")]
        start_response(captured["status"], headers, captured["exc_info"])
        return [body]


def serve(root: str, port: int, refresh_s: float) -> None:
    """The ``serve`` sub-command: the app on 127.0.0.1:port with the timing middleware."""
    import gc
    import logging

    from werkzeug.serving import make_server

    from app import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_app(root, refresh_s=refresh_s, prewarm=False)  # nothing read before a request
    gc.freeze()  # as app.serve does after create_app
    app.server.wsgi_app = ServerTiming(app.server.wsgi_app)
    make_server("127.0.0.1", port, app.server, threaded=True).serve_forever()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# A client that makes the renderer's requests
# --------------------------------------------------------------------------------------------
class Client:
    """One page: replays the Dash renderer's requests and keeps the returned state."""

    def __init__(self, url: str, run: str, smoothing: float = 0.6) -> None:
        self.url, self.run, self.smoothing = url, run, smoothing
        self.state: Any = None
        self.ticks = 0
        self.view: dict[str, Any] = {}

    def _request(self, path: str, body: Any = None) -> tuple[float, Any, int]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
            timing = resp.headers.get("Server-Timing", "app;dur=nan")
        ms = float(timing.split("dur=")[1])
        ctype = resp.headers.get("Content-Type", "")
        return ms, json.loads(raw) if raw and "json" in ctype else None, len(raw)

    def _call(self, dep: dict, values: Sequence[Any], changed: str) -> tuple[float, dict, int]:
        outputs = []
        for part in dep["output"].strip(".").split("..."):
            ident, prop = part.rsplit(".", 1)
            outputs.append({"id": ident, "property": prop.split("@")[0]})
        inputs = [
            {"id": i["id"], "property": i["property"], "value": v}
            for i, v in zip(dep["inputs"], values, strict=True)
        ]
        state = [{"id": s["id"], "property": s["property"], "value": None} for s in dep["state"]]
        body = {
            "output": dep["output"],
            "outputs": outputs if len(outputs) > 1 else outputs[0],
            "inputs": inputs,
            "state": state,
            "changedPropIds": [changed],
        }
        ms, answer, size = self._request("/_dash-update-component", body)
        return ms, (answer or {}).get("response", {}), size

    def load(self) -> dict[str, float]:
        """A page load; returns server times (ms) and the main answer's size."""
        times = {}
        for path in ("/", "/_dash-layout", "/_dash-dependencies"):
            ms, answer, _ = self._request(path)
            times[path] = ms
            if path == "/_dash-layout":
                layout = answer
            elif path == "/_dash-dependencies":
                deps = answer
        by_output = {d["output"]: d for d in deps}
        select = next(d for o, d in by_output.items() if o.startswith("..runs.value"))
        focus = next(d for o, d in by_output.items() if o.startswith("..focus.options"))
        layer = next(d for o, d in by_output.items() if o.startswith("..layer.options"))
        self.main = next(d for o, d in by_output.items() if "extendData" in o)
        ms, out, _ = self._call(select, [f"?run={self.run}"], "url.search")
        times["select run"] = ms
        runs = out["runs"]["value"]
        ms, out, _ = self._call(focus, [runs], "runs.value")
        times["focus"] = ms
        focus_run = out["focus"]["value"]
        ms, out, _ = self._call(layer, [focus_run], "focus.value")
        times["layer"] = ms
        self.panels, self.logs = _panels(layout)
        self.view = {"runs": runs, "focus": focus_run, "layer": out["layer"]["value"]}
        ms, size = self.update("runs.value")
        times["main (full build)"] = ms
        times["bytes"] = size
        return times

    def update(self, changed: str) -> tuple[float, int]:
        """One main-callback request (``pulse.data`` for a tick); returns (server ms, bytes)."""
        if changed == "pulse.data":
            self.ticks += 1

        def many(kind: str, prop: str) -> list:
            return [{"id": {"name": n, "type": kind}, "property": prop} for n in self.panels]

        body = {
            "output": self.main["output"],
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
                {"id": "runs", "property": "value", "value": self.view["runs"]},
                {"id": "focus", "property": "value", "value": self.view["focus"]},
                {"id": "smoothing", "property": "value", "value": self.smoothing},
                {"id": "xaxis", "property": "value", "value": "step"},
                {"id": "layer", "property": "value", "value": self.view["layer"]},
                [
                    {"id": {"name": n, "type": "log"}, "property": "value", "value": self.logs[n]}
                    for n in self.panels
                ],
            ],
            "state": [{"id": "state", "property": "data", "value": self.state}],
            "changedPropIds": [changed],
        }
        ms, answer, size = self._request("/_dash-update-component", body)
        new_state = ((answer or {}).get("response") or {}).get("state", {}).get("data")
        if new_state is not None:
            self.state = new_state
        return ms, size


def _panels(layout: Any) -> tuple[list[str], dict[str, list]]:
    panels, logs = [], {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "props" in node:
                ident = node["props"].get("id")
                if isinstance(ident, dict) and ident.get("type") == "panel":
                    panels.append(ident["name"])
                if isinstance(ident, dict) and ident.get("type") == "log":
                    logs[ident["name"]] = node["props"].get("value") or []
                walk(node["props"].get("children"))
            else:
                for v in node.values():
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(layout)
    return panels, logs


# --------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------
def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _load_ms(times: dict[str, float]) -> float:
    return sum(v for k, v in times.items() if k != "bytes")


def _med_range(values: Sequence[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    """``median (min–max)`` of ``values * scale``."""
    v = [x * scale for x in values]
    return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}–{max(v):{fmt}})"


def _snapshot(rev: str, into: Path) -> tuple[Path, str]:
    """``git archive`` of ``rev`` (the packages the benchmark runs) in a new directory."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = into / commit[:12]
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit, "app", "cockpit", "instruments", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, commit


class Server:
    """The app in its own process (the ``serve`` sub-command of the code in ``code``)."""

    def __init__(self, code: Path, root: Path, interval: float) -> None:
        port = _free_port()
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_dashboard",
                "serve",
                str(root),
                str(port),
                str(interval),
            ],
            cwd=code,
            env={**os.environ, "PYTHONPATH": str(code)},
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(self.url + "/api/runs", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("the dashboard server did not start") from None
                time.sleep(0.1)
        #: Seconds from spawning the process to its first answer (imports, create_app).
        self.startup_s = time.perf_counter() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _cpu_s(pid: int) -> float:
    """CPU time (user + system, all threads) of a process so far, from ``/proc`` (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cold_then_warm(code: Path, root: Path, interval: float) -> dict[str, Any]:
    """A fresh server: its first page load (cold), then a load with another view (warm).

    Also the server process's CPU time during each load (less sensitive to other processes
    on the machine than the elapsed server time; 10 ms resolution).
    """
    server = Server(code, root, interval)
    try:
        cpu0 = _cpu_s(server.proc.pid)
        cold = Client(server.url, RUN).load()
        cpu1 = _cpu_s(server.proc.pid)
        warm = Client(server.url, RUN, smoothing=0.51).load()
        cpu2 = _cpu_s(server.proc.pid)
    finally:
        server.close()
    return {
        "startup_s": server.startup_s,
        "cold": cold,
        "warm": warm,
        "cold_cpu_s": cpu1 - cpu0,
        "warm_cpu_s": cpu2 - cpu1,
    }


def _machine() -> dict[str, Any]:
    import platform

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version()}


def _live(
    code: Path, root: Path, run: RunWriter, args: argparse.Namespace, warm_first: list[float]
) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    """Warm and shared page loads, then refreshes while ``run`` grows; ``(rows, record)``."""
    rows: list[tuple[str, str, str]] = []
    record: dict[str, Any] = {}
    server = Server(code, root, args.interval)
    url = server.url
    stop = threading.Event()
    writer_thread = None
    try:
        Client(url, RUN).load()  # this server's cold load (measured on other starts)
        # Each load with its own smoothing: a view no client has seen, so every figure is
        # built (clients with the same view of the same rows would share the figures).
        warm = [Client(url, RUN, smoothing=0.5 + 0.01 * k).load() for k in range(3)]
        build = statistics.median(w["main (full build)"] for w in warm)
        rows.append(
            (
                "page load, warm (server; run cached, figures built)",
                f"{statistics.median(_load_ms(w) for w in warm) / 1e3:.2f} s median "
                f"of 3 (main build {build / 1e3:.2f} s, "
                f"{warm[0]['bytes'] / 1e6:.1f} MB); right after each cold load: "
                f"{_med_range(warm_first)} s",
                "< 2 s",
            )
        )
        shared = Client(url, RUN, smoothing=0.5).load()
        rows.append(
            (
                "page load, warm, same view as an earlier client (figures shared)",
                f"{_load_ms(shared) / 1e3:.2f} s",
                "",
            )
        )
        record.update(warm=warm, shared=shared)

        # Live refreshes: a writer appends steps, clients tick every interval.
        first_step = run.next_step

        def live_writer() -> None:
            period = 1.0 / args.live_steps_per_s
            while not stop.is_set():
                run.write(1)
                time.sleep(period)

        writer_thread = threading.Thread(target=live_writer, daemon=True)
        writer_thread.start()
        time.sleep(args.interval)

        def tick_loop(client: Client, out: list, until: float, offset: float) -> None:
            time.sleep(offset)
            while time.monotonic() < until:
                started = time.monotonic()
                ms, _ = client.update("pulse.data")
                out.append((ms, 1000.0 * (time.monotonic() - started)))
                time.sleep(max(0.0, args.interval - (time.monotonic() - started)))

        one = Client(url, RUN)
        one.load()
        single: list = []
        tick_loop(one, single, time.monotonic() + args.duration / 2, 0.0)
        server_ms = [s for s, _ in single]
        record["refresh_1"] = single
        rows.append(
            (
                "refresh, 1 client (server p50 / p95 / max)",
                f"{_pct(server_ms, 50):.0f} / {_pct(server_ms, 95):.0f} / "
                f"{max(server_ms):.0f} ms over {len(server_ms)} ticks",
                "< 300 ms",
            )
        )

        clients = [Client(url, RUN) for _ in range(args.clients)]
        for c in clients:
            c.load()
        results: list[list] = [[] for _ in clients]
        until = time.monotonic() + args.duration
        threads = [
            threading.Thread(
                target=tick_loop, args=(c, results[i], until, args.interval * i / len(clients))
            )
            for i, c in enumerate(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        server_ms = [s for r in results for s, _ in r]
        wall_ms = [w for r in results for _, w in r]
        record["refresh_many"] = results
        rows.append(
            (
                f"refresh, {args.clients} clients every {args.interval:g} s "
                "(server p50 / p95 / max)",
                f"{_pct(server_ms, 50):.0f} / {_pct(server_ms, 95):.0f} / "
                f"{max(server_ms):.0f} ms over {len(server_ms)} ticks",
                "< 1 s",
            )
        )
        rows.append(
            (
                f"refresh, {args.clients} clients (client wall p50 / p95)",
                f"{_pct(wall_ms, 50):.0f} / {_pct(wall_ms, 95):.0f} ms",
                "",
            )
        )
    finally:
        stop.set()
        if writer_thread is not None:
            writer_thread.join()
        server.close()
    rows.append(
        (
            "live steps appended meanwhile",
            f"{run.next_step - first_step:,} (run at {run.next_step:,} steps after)",
            "",
        )
    )
    return rows, record


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dashboard")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--curv-every", type=int, default=10)
    parser.add_argument("--hist-every", type=int, default=100)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between ticks")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of ticking")
    parser.add_argument("--live-steps-per-s", type=float, default=25.0)
    parser.add_argument("--cold-runs", type=int, default=5, help="server starts per code version")
    parser.add_argument(
        "--rev", default="HEAD", help="commit to measure (git archive), or 'worktree'"
    )
    parser.add_argument("--compare", default=None, help="also time cold loads of this commit")
    parser.add_argument("--root", default=None, help="log root to use (default: a temp dir)")
    parser.add_argument(
        "--out",
        default=str(Path(__file__).parent / "results"),
        help="directory for dashboard.json and dashboard.md ('-': print only)",
    )
    args = parser.parse_args(argv)

    load_start = os.getloadavg()
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    tmp = Path(tempfile.mkdtemp(prefix="cockpit-bench-dashboard-"))
    root = Path(args.root) if args.root else tmp / "root"
    root.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    record: dict[str, Any] = {"date": date, "machine": _machine(), "args": vars(args)}
    run: RunWriter | None = None
    try:
        if args.rev == "worktree":
            code, commit = ROOT, "working tree"
        else:
            code, commit = _snapshot(args.rev, tmp / "code")
        versions = {"measured": code}
        commits = {"measured": commit}
        if args.compare:
            versions["baseline"], commits["baseline"] = _snapshot(args.compare, tmp / "code")
        record["commits"] = commits
        sys.path.insert(0, str(code))  # the writer of the measured code writes the run

        t0 = time.perf_counter()
        run = RunWriter(root / RUN, args.curv_every, args.hist_every)
        for _ in range(0, args.steps, 1000):
            run.write(min(1000, args.steps - run.next_step))
        run.writer.flush()
        write_s = time.perf_counter() - t0
        rows.append(
            (
                "run",
                f"{args.steps:,} steps: {run.scalar_rows:,} scalar rows, "
                f"{run.hist_rows:,} histograms, {_segment_files(root / RUN)} "
                f"segment files (written in {write_s:.0f} s)",
                "",
            )
        )

        # Cold loads: each is the first page load of a freshly started server process (nothing
        # read, nothing built; the files are in the OS page cache, as right after training).
        # Code versions alternate, and which goes first alternates too.
        cold: dict[str, list[dict[str, Any]]] = {name: [] for name in versions}
        order = list(versions)
        for k in range(args.cold_runs):
            for name in order if k % 2 == 0 else order[::-1]:
                cold[name].append(_cold_then_warm(versions[name], root, args.interval))
        record["cold"] = cold
        for name in versions:
            runs = cold[name]
            label = "" if name == "measured" else f" — baseline {commits[name][:7]}"
            loads = [_load_ms(r["cold"]) / 1e3 for r in runs]
            reads = [r["cold"]["layer"] / 1e3 for r in runs]
            builds = [r["cold"]["main (full build)"] / 1e3 for r in runs]
            version_rows = [
                (
                    "page load, cold (server; first load after a start)",
                    f"{_med_range(loads)} s, median (min–max) of {len(runs)} starts: "
                    f"reading {_med_range(reads)} s + main build {_med_range(builds)} s; "
                    f"{runs[0]['cold']['bytes'] / 1e6:.1f} MB",
                    "< 2 s",
                ),
                (
                    "page load, cold: server process CPU time (user + system, all threads)",
                    f"{_med_range([r['cold_cpu_s'] for r in runs])} s",
                    "",
                ),
                (
                    "server start (spawn to first answer)",
                    f"{_med_range([r['startup_s'] for r in runs])} s",
                    "",
                ),
            ]
            warm_first = [_load_ms(r["warm"]) / 1e3 for r in runs]
            live_rows, record[f"live_{name}"] = _live(versions[name], root, run, args, warm_first)
            rows += [
                (f"{what}{label}", result, "" if label else target)
                for what, result, target in version_rows + live_rows
            ]
    finally:
        if run is not None:
            run.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)

    load_end = os.getloadavg()
    record.update(load_start=load_start, load_end=load_end, rows=rows)
    machine = record["machine"]
    lines = [
        "# Dashboard benchmark",
        "",
        "Server time (the sum of the `Server-Timing` durations of a page load's requests, or of "
        f"one refresh) on a {args.steps:,}-step `full`-preset run. *Cold*: the first page load "
        "after the server process started (nothing read, nothing built; the Parquet files are in "
        "the OS page cache). Generated by `python -m benchmarks.bench_dashboard`; do not edit by "
        "hand.",
        "",
        f"- machine: {machine['cpu'] or 'unknown CPU'}, {machine['cpus']} CPUs, "
        f"Python {machine['python']}",
        f"- date: {date}; load average at start {'/'.join(f'{x:.1f}' for x in load_start)}, "
        f"at end {'/'.join(f'{x:.1f}' for x in load_end)}",
        "- code: "
        + "; ".join(f"{name} {c if c == 'working tree' else c[:7]}" for name, c in commits.items()),
        "",
        "| measurement | result | target |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out != "-":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dashboard.md").write_text(text)
        (out / "dashboard.json").write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
