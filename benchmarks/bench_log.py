"""Benchmark the Parquet log: reads, incremental reads, writer overhead, disk per step.

Run with ``python -m benchmarks.bench_log`` (or ``python benchmarks/bench_log.py``).
Prints a Markdown table and writes ``benchmarks/results/log.md`` and ``log.json``
(``--out DIR`` elsewhere). Targets: 10^6 scalar rows and 10^4 histogram rows read
in < 1 s each, the newest 100 steps of a 10^5-step run in < 50 ms, writer overhead
< 2 % of a plain step on workload B; disk per 10^4 steps of the ``full`` preset is
reported.

Layouts: "segments" is one file per 10 steps (the writer hands a batch off every
``ceil(flush_every_steps / 2)`` steps, default 20 / 2) with background compaction
off; "writer default" is what the writer leaves with its default
``compact_every=100`` (one file per 1000 steps plus the newest single segments);
"compacted" is the run after :func:`cockpit.logwriter.compact`. The read
benchmarks build their runs by writing segment files with the log schema
directly (no fsync, to keep the setup short); the writer benchmarks go through
:class:`LogWriter` on disk.

Full preset. A real run of workload B (3C3D) logged by ``Cockpit(instruments=
"full")`` with every instrument every step (``--full-steps``, ``--full-n``; row
counts do not depend on N, so a small batch keeps the run short on a CPU). Its
size on disk is divided by its steps and extrapolated linearly to 10^4 steps:
as written (with the time hand-off, slow CPU steps give small segments), and
its rows replayed through a fresh default LogWriter as a fast run would write
them (a segment per 10 steps), before and after compaction. Sizes are the files'
bytes (``st_size``) and, for ``du``, the blocks allocated. The same rows, replayed
one real step per plain training step of workload B (N = 128), give the writer
overhead: time in ``add_*`` plus the CPU time of the writer's background threads
(measured on a longer fast replay, so it includes compaction), divided by the
median plain step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cockpit.logreader import LogTail, read_histograms, read_log, read_meta
from cockpit.logwriter import LogWriter, _compact_table, compact
from cockpit.schema import HISTOGRAMS_SCHEMA, SCALARS_SCHEMA, TABLES, segment_file_name

RESULTS = Path(__file__).resolve().parent / "results"

ROWS_PER_STEP = 10
STEPS_PER_SEGMENT = 10  # LogWriter default: a hand-off every ceil(20 / 2) steps


def _scalar_segment(first_step: int, steps: int) -> pa.Table:
    step = np.repeat(np.arange(first_step, first_step + steps, dtype=np.int64), ROWS_PER_STEP)
    n = len(step)
    instruments = ["loss", "grad_norm", "grad_norm", "grad_norm", "alpha"] * 2
    params = ["all", "all", "0.weight", "0.bias", "all", "2.weight", "2.bias", "all", "all", "all"]
    metrics = ["loss", "grad_norm", "grad_norm", "grad_norm", "alpha"] + ["x", "y", "z", "u", "v"]
    return pa.table(
        {
            "step": step,
            "wall_time": 1.7e9 + step * 0.01,
            "instrument": instruments * (n // ROWS_PER_STEP),
            "metric": metrics * (n // ROWS_PER_STEP),
            "param": params * (n // ROWS_PER_STEP),
            "value": np.random.default_rng(first_step).standard_normal(n),
        },
        schema=SCALARS_SCHEMA,
    )


def build_scalar_run(run: Path, steps: int) -> None:
    """Write ``steps`` steps of ``ROWS_PER_STEP`` rows, one segment per 10 steps."""
    (run / "scalars").mkdir(parents=True)
    for number, first in enumerate(range(0, steps, STEPS_PER_SEGMENT)):
        table = _scalar_segment(first, min(STEPS_PER_SEGMENT, steps - first))
        pq.write_table(table, run / "scalars" / segment_file_name(number))


def build_histogram_run(run: Path, rows: int) -> None:
    """Write ``rows`` histograms (half 1D with 64 bins, half 2D with 32x32), 10 per segment."""
    (run / "histograms").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for number, first in enumerate(range(0, rows, STEPS_PER_SEGMENT)):
        records = []
        for i in range(first, min(first + STEPS_PER_SEGMENT, rows)):
            if i % 2 == 0:
                shape, edges_1 = [64], []
                counts = rng.random(64)
            else:
                shape, edges_1 = [32, 32], np.linspace(-1, 1, 33)
                counts = rng.random(32 * 32)
            records.append(
                {
                    "step": i // 2,
                    "wall_time": 1.7e9 + i,
                    "instrument": "grad_hist_1d" if i % 2 == 0 else "grad_hist_2d",
                    "param": "all",
                    "shape": shape,
                    "counts": counts,
                    "edges_0": np.linspace(-1, 1, shape[0] + 1),
                    "edges_1": edges_1,
                }
            )
        table = pa.Table.from_pylist(records, schema=HISTOGRAMS_SCHEMA)
        pq.write_table(table, run / "histograms" / segment_file_name(number))


def best_of(fn, repeat: int = 3) -> float:
    """Return the best wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_reads(tmp: Path, results: list[tuple[str, str, str, str]]) -> None:
    steps = 10**6 // ROWS_PER_STEP
    run = tmp / "scalars-run"
    build_scalar_run(run, steps)
    n_files = len(list((run / "scalars").iterdir()))
    assert len(read_log(run)) == 10**6
    results.append(
        (
            "read_log, 10^6 scalar rows",
            f"segments ({n_files} files)",
            f"{best_of(lambda: read_log(run)):.3f} s",
            "< 1 s",
        )
    )
    # Incremental read of the newest 100 steps (10 segments), uncompacted.
    newest = 100 // STEPS_PER_SEGMENT
    tail = LogTail(run)
    tail.cursor = n_files - 1 - newest

    def tail_read():
        tail.cursor = n_files - 1 - newest
        frame = tail.read_new()
        assert len(frame) == 100 * ROWS_PER_STEP

    results.append(
        (
            "LogTail.read_new, newest 100 steps of 10^5",
            f"segments ({n_files} files)",
            f"{best_of(tail_read, 5) * 1e3:.1f} ms",
            "< 50 ms",
        )
    )
    results.append(
        (
            "LogTail.read_new, nothing new",
            f"segments ({n_files} files)",
            f"{best_of(tail.read_new, 5) * 1e3:.1f} ms",
            "",
        )
    )
    since = steps - 100
    results.append(
        (
            "read_log(since_step=...), newest 100 steps",
            f"segments ({n_files} files)",
            f"{best_of(lambda: read_log(run, since_step=since)):.3f} s",
            "",
        )
    )

    # What a LogWriter with the default compact_every=100 leaves mid-run: one
    # file per 100 segments, plus up to 100 single segments not merged yet.
    auto = tmp / "auto-run"
    shutil.copytree(run, auto)
    for lo in range(0, n_files - 100, 100):
        _compact_table(auto, "scalars", lo, lo + 99)
    n_auto = len(list((auto / "scalars").iterdir()))
    assert len(read_log(auto)) == 10**6
    auto_layout = f"writer default, compact_every=100 ({n_auto} files)"
    results.append(
        (
            "read_log, 10^6 scalar rows",
            auto_layout,
            f"{best_of(lambda: read_log(auto)):.3f} s",
            "< 1 s",
        )
    )
    auto_tail = LogTail(auto)

    def auto_tail_read():
        auto_tail.cursor = n_files - 1 - newest
        assert len(auto_tail.read_new()) == 100 * ROWS_PER_STEP

    results.append(
        (
            "LogTail.read_new, newest 100 steps of 10^5",
            auto_layout,
            f"{best_of(auto_tail_read, 5) * 1e3:.1f} ms",
            "< 50 ms",
        )
    )
    results.append(
        (
            "read_log(since_step=...), newest 100 steps",
            auto_layout,
            f"{best_of(lambda: read_log(auto, since_step=since)) * 1e3:.1f} ms",
            "",
        )
    )

    # Compact all but the newest 100 steps, as compact() on a live run would.
    for number in range(n_files - newest, n_files):
        path = run / "scalars" / segment_file_name(number)
        path.rename(path.with_name("." + path.name + ".aside"))
    start = time.perf_counter()
    compact(run, "scalars")
    compact_time = time.perf_counter() - start
    for number in range(n_files - newest, n_files):
        path = run / "scalars" / segment_file_name(number)
        path.with_name("." + path.name + ".aside").rename(path)
    results.append(
        (
            "compact, 10^6 - 1000 rows",
            f"{n_files - newest} files -> 1",
            f"{compact_time:.3f} s",
            "",
        )
    )
    results.append(
        (
            "LogTail.read_new, newest 100 steps of 10^5",
            f"compacted + {newest} files",
            f"{best_of(tail_read, 5) * 1e3:.1f} ms",
            "< 50 ms",
        )
    )
    results.append(
        (
            "read_log(since_step=...), newest 100 steps",
            f"compacted + {newest} files",
            f"{best_of(lambda: read_log(run, since_step=since)) * 1e3:.1f} ms",
            "",
        )
    )
    compact(run, "scalars")
    assert len(read_log(run)) == 10**6
    results.append(
        (
            "read_log, 10^6 scalar rows",
            "compacted (1 file)",
            f"{best_of(lambda: read_log(run)):.3f} s",
            "< 1 s",
        )
    )

    hist_run = tmp / "hist-run"
    build_histogram_run(hist_run, 10**4)
    n_hist = len(list((hist_run / "histograms").iterdir()))
    assert len(read_histograms(hist_run)) == 10**4
    results.append(
        (
            "read_histograms, 10^4 rows (64 / 32x32 bins)",
            f"segments ({n_hist} files)",
            f"{best_of(lambda: read_histograms(hist_run)):.3f} s",
            "< 1 s",
        )
    )
    compact(hist_run)
    results.append(
        (
            "read_histograms, 10^4 rows (64 / 32x32 bins)",
            "compacted (1 file)",
            f"{best_of(lambda: read_histograms(hist_run)):.3f} s",
            "< 1 s",
        )
    )


def bench_writer(tmp: Path, results: list[tuple[str, str, str, str]], steps: int) -> None:
    """Caller time of ``add_*`` with steps 5 ms apart, and back to back (disk-bound)."""
    rows = [("grad_norm", "grad_norm", f"{i}.weight", 1.0) for i in range(ROWS_PER_STEP - 1)]
    rows.append(("loss", "loss", "all", 0.5))
    counts, edges = np.ones(64), [np.linspace(-1, 1, 65)]
    layout = f"{ROWS_PER_STEP} scalars/step + 1 hist/10 steps"

    def run(name: str, n_steps: int, pause: float) -> tuple[list[float], float, float, str]:
        per_step = []
        start_all = time.perf_counter()
        with LogWriter(tmp / name) as log:  # defaults: a hand-off per 10 steps, fsync on
            for step in range(n_steps):
                start = time.perf_counter()
                log.add_scalars(step, rows)
                if step % 10 == 0:
                    log.add_histogram(step, "grad_hist_1d", "all", counts, edges)
                per_step.append(time.perf_counter() - start)
                if pause:
                    time.sleep(pause)
            waits = _waits(log)
            start = time.perf_counter()
        end = time.perf_counter()
        return sorted(t * 1e6 for t in per_step), end - start, end - start_all, waits

    def spread(us: list[float]) -> str:
        return (
            f"{statistics.median(us):.1f} / {statistics.fmean(us):.1f} / "
            f"{us[int(0.99 * len(us))]:.1f} / {us[-1]:.0f} µs"
        )

    paced, _, _, waits = run("writer-paced", min(steps, 2000), 0.005)
    results.append(
        (
            "LogWriter add_* time per step (median / mean / p99 / max)",
            f"{layout}, steps 5 ms apart, {len(paced)} steps",
            f"{spread(paced)}; {waits}",
            "",
        )
    )
    tight, close_time, total, waits = run("writer-tight", steps, 0.0)
    results.append(
        (
            "LogWriter back to back: time per step (median / mean / p99 / max)",
            f"{layout}, no work between steps, {steps} steps",
            f"{spread(tight)}; {steps / total:.0f} steps/s; {waits}",
            "",
        )
    )
    results.append(
        (
            "LogWriter close (final flush, compaction in progress, END)",
            f"{layout}, {steps} steps",
            f"{close_time * 1e3:.1f} ms",
            "",
        )
    )


def run_full_preset(run_dir: Path, workload: str, steps: int, n: int) -> float:
    """Train ``workload`` for ``steps`` real steps, logged by ``Cockpit(instruments="full")``.

    Every instrument of the preset runs every step (Cockpit's default schedule),
    the LogWriter has its default settings, and each step draws a fresh random
    batch of ``n`` samples. Returns the mean seconds per step.
    """
    import torch

    from benchmarks.harness import NUM_THREADS
    from benchmarks.workloads import get
    from cockpit import Cockpit

    torch.set_num_threads(NUM_THREADS)
    w = get(workload)
    model, loss_fn = w.model(), w.loss_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # TIC: non-PD curvature on 3C3D
        with Cockpit(model, loss_fn, opt, instruments="full", logdir=run_dir) as cockpit:
            for step in range(steps):
                x, y = w.data(n, seed=step)
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                with cockpit.step(step, loss):
                    loss.backward()
                opt.step()
    return (time.perf_counter() - start) / steps


def load_calls(run_dir: Path) -> list[list[tuple[str, int, Any]]]:
    """The writer calls behind a run: one list per step, histograms and events before scalars.

    Scalar rows keep their order on disk; a value logged late for an earlier
    step (alpha) is replayed with its own step.
    """
    by_step: dict[int, list[tuple[str, int, Any]]] = defaultdict(list)
    for row in pq.read_table(run_dir / "histograms").to_pylist():
        shape = row["shape"]
        edges = [np.asarray(row["edges_0"])]
        if len(shape) == 2:
            edges.append(np.asarray(row["edges_1"]))
        counts = np.asarray(row["counts"]).reshape(shape)
        payload = (row["instrument"], row["param"], counts, edges, row["wall_time"])
        by_step[row["step"]].append(("histogram", row["step"], payload))
    if any((run_dir / "events").glob("part-*.parquet")):
        for row in pq.read_table(run_dir / "events").to_pylist():
            payload = (row["level"], row["message"], row["instrument"])
            by_step[row["step"]].append(("event", row["step"], payload))
    scalars = pq.read_table(run_dir / "scalars").to_pylist()
    for step, group in itertools.groupby(scalars, key=lambda row: row["step"]):
        rows = [(r["instrument"], r["metric"], r["param"], r["value"]) for r in group]
        by_step[step].append(("scalars", step, rows))
    return [by_step[step] for step in sorted(by_step) if step >= 0]


def replay(log: LogWriter, calls: list[tuple[str, int, Any]], step: int) -> None:
    """Make one step's writer calls again, as step ``step``."""
    for kind, _, payload in calls:
        if kind == "scalars":
            log.add_scalars(step, payload)
        elif kind == "histogram":
            instrument, param, counts, edges, _ = payload
            log.add_histogram(step, instrument, param, counts, edges)
        else:
            level, message, instrument = payload
            log.add_event(level, message, step=step, instrument=instrument)


def disk_usage(run_dir: Path) -> dict[str, Any]:
    """Bytes (``st_size``), allocated bytes (``du``) and files of each table, and in total."""
    usage: dict[str, Any] = {}
    total = {"bytes": 0, "allocated": 0, "files": 0}
    for name in (*TABLES, "."):
        folder = run_dir / name
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        stats = [p.stat() for p in files]
        entry = {
            "bytes": sum(st.st_size for st in stats),
            "allocated": sum(st.st_blocks * 512 for st in stats),
            "files": len(files),
        }
        usage["run files" if name == "." else name] = entry
        for key in total:
            total[key] += entry[key]
    usage["total"] = total
    return usage


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def bench_disk(
    tmp: Path, results: list[tuple[str, str, str, str]], full_run: Path, info: dict[str, Any]
) -> list[list[tuple[str, int, Any]]]:
    """Disk per step of a real full-preset run, as written and replayed; returns its calls."""
    calls = load_calls(full_run)
    steps = len(calls)
    layouts = {"as written by Cockpit": disk_usage(full_run)}
    fast = tmp / "full-replay"
    with LogWriter(fast, read_meta(full_run), flush_every_seconds=1e9, compact_every=None) as log:
        for step, step_calls in enumerate(calls):
            replay(log, step_calls, step)
    layouts["fast run: a segment per 10 steps"] = disk_usage(fast)
    compact(fast)
    layouts["compacted (one file per table)"] = disk_usage(fast)
    info["disk"] = {"steps": steps, "layouts": layouts}
    scalar_rows = sum(len(p) for c in calls for kind, _, p in c if kind == "scalars")
    hist_rows = sum(1 for c in calls for kind, _, _ in c if kind == "histogram")
    info["disk"]["rows_per_step"] = {
        "scalars": scalar_rows / steps,
        "histograms": hist_rows / steps,
    }
    for layout, usage in layouts.items():
        per_step = (usage["total"]["bytes"] - usage["run files"]["bytes"]) / steps
        alloc = (usage["total"]["allocated"] - usage["run files"]["allocated"]) / steps
        tables = ", ".join(f"{t} {usage[t]['files']}" for t in TABLES)
        results.append(
            (
                f"disk per 10^4 steps, full preset, B (linear from {steps} steps)",
                f"{layout} (files: {tables})",
                f"{_mb(per_step * 1e4)} ({per_step / 1e3:.1f} kB/step); du {_mb(alloc * 1e4)}",
                "reported",
            )
        )
    return calls


def _waits(log: LogWriter) -> str:
    """How often new steps waited for the disk to keep the loss bound."""
    worker = log._worker
    return f"{worker.bound_waits} waits for the disk ({worker.bound_wait_seconds:.2f} s)"


def _thread_cpu(threads: list[threading.Thread]) -> float:
    """CPU seconds the (running) ``threads`` have used so far."""
    return sum(
        time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        for t in threads
        if t is not None and t.ident is not None and t.is_alive()
    )


def bench_overhead(
    tmp: Path,
    results: list[tuple[str, str, str, str]],
    calls: list[list[tuple[str, int, Any]]],
    info: dict[str, Any],
    steps: int,
    replay_steps: int,
) -> None:
    """Writer overhead on workload B: full-preset rows of one real step per plain step."""
    import torch

    from benchmarks.harness import NUM_THREADS
    from benchmarks.workloads import get

    # Background CPU per step on a fast replay long enough for compactions: the
    # process's CPU time less the main thread's, up to the end of close().
    meta = read_meta(tmp / "full-replay")
    process0, main0 = time.process_time(), time.thread_time()
    start = time.perf_counter()
    with LogWriter(tmp / "overhead-replay", meta) as log:
        for step in range(replay_steps):
            replay(log, calls[step % len(calls)], step)
    replay_wall = time.perf_counter() - start
    background = (time.process_time() - process0 - (time.thread_time() - main0)) / replay_steps

    torch.set_num_threads(NUM_THREADS)
    w = get("B")
    model, loss_fn = w.model(), w.loss_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = w.data(w.n)

    def plain_step() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(3):
        plain_step()
    plain, caller = [], []
    with LogWriter(tmp / "overhead-run", meta) as log:
        threads = [log._worker.thread, log._worker.compactor]
        cpu0 = _thread_cpu(threads)
        for step in range(steps):
            t0 = time.perf_counter()
            plain_step()
            t1 = time.perf_counter()
            replay(log, calls[step % len(calls)], step)
            caller.append(time.perf_counter() - t1)
            plain.append(t1 - t0)
        background_here = (_thread_cpu(threads) - cpu0) / steps
        waits = _waits(log)
    plain_s = statistics.median(plain)
    caller_s = statistics.fmean(caller)
    overhead = (caller_s + background) / plain_s
    info["overhead"] = {
        "plain_step_median_s": plain_s,
        "plain_steps": steps,
        "caller_mean_s": caller_s,
        "caller_max_s": max(caller),
        "background_cpu_per_step_s": background,
        "background_cpu_per_step_in_training_s": background_here,
        "replay_steps": replay_steps,
        "replay_wall_per_step_s": replay_wall / replay_steps,
        "ratio": overhead,
        "waits": waits,
    }
    layout = (
        f"B, N={w.n}: {steps} plain steps (median {plain_s * 1e3:.0f} ms), each followed by "
        f"one real full-preset step's rows"
    )
    results.append(
        (
            "writer overhead: add_* time + background CPU (incl. compaction), per plain step",
            layout,
            f"{overhead * 100:.2f} % ({caller_s * 1e3:.2f} ms + {background * 1e3:.2f} ms); "
            f"{waits}",
            "< 2 %" + (" ✓" if overhead < 0.02 else " ✗"),
        )
    )


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _markdown(results: list[tuple[str, str, str, str]], info: dict[str, Any]) -> str:
    meta, full = info["meta"], info["full_run"]
    lines = [
        "# Log benchmark",
        "",
        "Generated by `python -m benchmarks.bench_log`; do not edit by hand. "
        "See the module docstring of `benchmarks/bench_log.py` for the method.",
        "",
        f"- machine: {meta.get('cpu_model', meta['processor'])}, {meta['cpu_count']} CPUs, "
        f"torch {meta['torch']} ({meta['num_threads']} threads), python {meta['python']}",
        f"- date: {meta['date']}; load average at start "
        + "/".join(f"{x:.1f}" for x in meta["loadavg_start"])
        + ", at end "
        + "/".join(f"{x:.1f}" for x in meta["loadavg_end"])
        + f"; commit {meta['git_commit']}",
        f"- full-preset run: workload B, N = {full['n']}, {full['steps']} steps, "
        f"{full['seconds_per_step']:.2f} s/step on this CPU"
        + (f" (reused from {full['reused']})" if full.get("reused") else ""),
        "",
        "| benchmark | layout | result | target |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks, print a Markdown table and write ``log.md`` / ``log.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to build the runs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--writer-steps", type=int, default=10_000)
    parser.add_argument("--full-steps", type=int, default=300, help="steps of the real run")
    parser.add_argument("--full-n", type=int, default=2, help="batch size of the real run")
    parser.add_argument(
        "--full-run",
        type=Path,
        help="run directory of the real full-preset run: reused if it is finished, "
        "written there otherwise (default: a temp dir)",
    )
    parser.add_argument("--overhead-steps", type=int, default=30, help="plain B steps (N=128)")
    parser.add_argument("--replay-steps", type=int, default=2000, help="fast replay steps")
    parser.add_argument("--skip-reads", action="store_true", help="only the writer and disk")
    args = parser.parse_args(argv)

    from benchmarks.harness import machine_info

    info: dict[str, Any] = {"meta": machine_info("cpu"), "options": {}}
    info["meta"]["git_commit"] = _git_commit()
    info["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        full_run = args.full_run or tmp / "full-B"
        if (full_run / "END").exists():
            full = json.loads((full_run / "full_run.json").read_text())
            full["reused"] = str(full_run)
        else:
            seconds = run_full_preset(full_run, "B", args.full_steps, args.full_n)
            full = {"n": args.full_n, "steps": args.full_steps, "seconds_per_step": seconds}
            (full_run / "full_run.json").write_text(json.dumps(full))
        info["full_run"] = full
        calls = bench_disk(tmp, results, full_run, info)
        bench_overhead(tmp, results, calls, info, args.overhead_steps, args.replay_steps)
        bench_writer(tmp, results, args.writer_steps)
        if not args.skip_reads:
            bench_reads(tmp, results)
    info["meta"]["loadavg_end"] = list(os.getloadavg())
    keys = ("benchmark", "layout", "result", "target")
    info["results"] = [dict(zip(keys, row, strict=True)) for row in results]
    text = _markdown(results, info)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "log.md").write_text(text)
    (args.out / "log.json").write_text(json.dumps(info, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
