"""Benchmark the Parquet log: read times, incremental reads, writer overhead.

Run with ``python -m benchmarks.bench_log`` (or ``python benchmarks/bench_log.py``).
Prints a Markdown table. Targets: 10^6 scalar rows and 10^4 histogram rows read
in < 1 s each, the newest 100 steps of a 10^5-step run in < 50 ms.

Layouts: "segments" is one file per 20 steps (the default
``flush_every_steps=20``) with background compaction off; "writer default" is
what the writer leaves with its default ``compact_every=100`` (one file per
2000 steps plus the newest single segments); "compacted" is the run after
:func:`cockpit.logwriter.compact`. The read benchmarks build their runs
by writing segment files with the log schema directly (no fsync, to keep the
setup short); the writer benchmark goes through :class:`LogWriter` on disk.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cockpit.logreader import LogTail, read_histograms, read_log
from cockpit.logwriter import LogWriter, _compact_table, compact
from cockpit.schema import HISTOGRAMS_SCHEMA, SCALARS_SCHEMA, segment_file_name

ROWS_PER_STEP = 10
STEPS_PER_SEGMENT = 20


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
    """Write ``steps`` steps of ``ROWS_PER_STEP`` rows, one segment per 20 steps."""
    (run / "scalars").mkdir(parents=True)
    for number, first in enumerate(range(0, steps, STEPS_PER_SEGMENT)):
        table = _scalar_segment(first, min(STEPS_PER_SEGMENT, steps - first))
        pq.write_table(table, run / "scalars" / segment_file_name(number))


def build_histogram_run(run: Path, rows: int) -> None:
    """Write ``rows`` histograms (half 1D with 64 bins, half 2D with 32x32), 20 per segment."""
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
    # Incremental read of the newest 100 steps (5 segments), uncompacted.
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
    rows = [("grad_norm", "grad_norm", f"{i}.weight", 1.0) for i in range(ROWS_PER_STEP - 1)]
    rows.append(("loss", "loss", "all", 0.5))
    counts, edges = np.ones(64), [np.linspace(-1, 1, 65)]
    per_step = []
    with LogWriter(tmp / "writer-run") as log:  # defaults: 20 steps per flush, fsync on
        for step in range(steps):
            start = time.perf_counter()
            log.add_scalars(step, rows)
            if step % 10 == 0:
                log.add_histogram(step, "grad_hist_1d", "all", counts, edges)
            per_step.append(time.perf_counter() - start)
        start = time.perf_counter()
    close_time = time.perf_counter() - start
    per_step_us = sorted(t * 1e6 for t in per_step)
    mean, p99 = statistics.fmean(per_step_us), per_step_us[int(0.99 * len(per_step_us))]
    layout = f"{ROWS_PER_STEP} scalars/step + 1 hist/10 steps, {steps} steps"
    results.append(
        (
            "LogWriter caller overhead per step (mean / p99 / max)",
            layout,
            f"{mean:.1f} / {p99:.1f} / {per_step_us[-1]:.0f} µs",
            "",
        )
    )
    results.append(("LogWriter close (final flush, END)", layout, f"{close_time * 1e3:.1f} ms", ""))


def main() -> None:
    """Run the benchmarks and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to build the runs (default: a temp dir)")
    parser.add_argument("--writer-steps", type=int, default=10_000)
    args = parser.parse_args()
    results: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench_writer(Path(tmp), results, args.writer_steps)
        bench_reads(Path(tmp), results)
    print("| benchmark | layout | time | target |")
    print("|---|---|---|---|")
    for row in results:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
