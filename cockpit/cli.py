"""The ``cockpit`` command: list, summarize, export and compact logged runs; serve the dashboard.

Usage::

    cockpit ls ROOT
    cockpit summary RUN
    cockpit export RUN --format csv|parquet --out PATH [--table scalars|histograms|events]
    cockpit compact RUN
    cockpit dashboard ROOT [--host 127.0.0.1] [--port 8050] [--refresh 2]

``summary`` shows, for every instrument/metric logged for param ``"all"``, the
last value (the value at the highest step; of the rows of that step the one
logged last), the minimum and maximum over the run (NaN values ignored), the
number of rows and the last step, followed by the run's events. It does not
guess whether lower or higher is better: for loss-like metrics read ``min``.

Errors (a missing run or root, an unreadable log) print a message to stderr and
exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cockpit.logreader import list_runs, read_events, read_histograms, read_log, read_meta
from cockpit.logwriter import compact
from cockpit.schema import PARAM_ALL, TABLES, SchemaVersionError

__all__ = ["main", "summarize"]


class _CliError(Exception):
    """A user-facing error: printed and turned into exit status 2."""


def _format_time(seconds: float) -> str:
    if pd.isna(seconds):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _require_run(path: str) -> Path:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise _CliError(f"run directory {run_dir} does not exist")
    if not (run_dir / "meta.json").exists() and not any((run_dir / t).is_dir() for t in TABLES):
        raise _CliError(f"{run_dir} is not a cockpit run (no meta.json, no log tables)")
    return run_dir


def _require_root(path: str) -> Path:
    root = Path(path)
    if not root.exists():
        raise _CliError(f"log root {root} does not exist")
    if not root.is_dir():
        raise _CliError(f"log root {root} is not a directory")
    return root


def summarize(run_dir: str | Path) -> pd.DataFrame:
    """Summarize the model-wide scalars of a run.

    Args:
        run_dir: The run directory.

    Returns:
        One row per ``(instrument, metric)`` logged with ``param == "all"``:
        columns ``instrument, metric, last, min, max, rows, last_step``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.cli import summarize
        >>> from cockpit.logwriter import LogWriter
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with LogWriter(Path(tmp) / "run") as writer:
        ...         for step, loss in enumerate([0.9, 0.4, 0.6]):
        ...             writer.add_scalar(step, "loss", "loss", "all", loss)
        ...             writer.add_scalar(step, "grad_norm", "grad_norm", "0.weight", 1.0)
        ...     summary = summarize(Path(tmp) / "run")
        >>> print(summary.to_string(index=False))  # per-tensor rows are left out
        instrument metric  last  min  max  rows  last_step
              loss   loss   0.6  0.4  0.9     3          2
    """
    log = read_log(run_dir)
    log = log[log["param"] == PARAM_ALL]
    columns = ["instrument", "metric", "last", "min", "max", "rows", "last_step"]
    if log.empty:
        return pd.DataFrame(columns=columns)
    grouped = log.groupby(["instrument", "metric"], sort=True)
    # read_log sorts by step, stably, so the last row of a group is the newest value.
    summary = grouped["value"].agg(min="min", max="max", rows="size")
    summary.insert(0, "last", grouped["value"].last(skipna=False))
    summary["last_step"] = grouped["step"].max()
    return summary.reset_index()[columns]


def _cmd_ls(args: argparse.Namespace) -> int:
    runs = list_runs(_require_root(args.root))
    if runs.empty:
        print(f"no runs under {args.root}")
        return 0
    table = pd.DataFrame(
        {
            "run": runs["run_id"],
            "status": runs["status"],
            "steps": runs["steps"],
            "last update": [_format_time(t) for t in runs["last_update"]],
        }
    )
    print(table.to_string(index=False))
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    run_dir = _require_run(args.run)
    try:
        meta = read_meta(run_dir)
    except FileNotFoundError:
        meta = {}
    print(f"run {run_dir.name}  ({run_dir})")
    if meta:
        print(f"started {_format_time(meta.get('start_time', float('nan')))}")
        if meta.get("tags"):
            print(f"tags {json.dumps(meta['tags'], default=str)}")
    summary = summarize(run_dir)
    print()
    if summary.empty:
        print("no scalars logged")
    else:
        with pd.option_context("display.width", 200, "display.max_rows", None):
            print(summary.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    events = read_events(run_dir)
    print()
    if events.empty:
        print("no events")
    else:
        print(f"events ({len(events)}):")
        for event in events.itertuples(index=False):
            where = f"step {event.step}" if event.step >= 0 else "-"
            source = f" [{event.instrument}]" if event.instrument else ""
            print(f"  {event.level:<7} {where}{source}: {event.message}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    run_dir = _require_run(args.run)
    if args.table == "scalars":
        frame = read_log(run_dir)
    elif args.table == "histograms":
        frame = read_histograms(run_dir)
    else:
        frame = read_events(run_dir)
    out = Path(args.out)
    if out.parent and not out.parent.is_dir():
        raise _CliError(f"output directory {out.parent} does not exist")
    if args.format == "parquet":
        if args.table == "histograms":
            frame = frame.assign(
                shape=[list(s) for s in frame["shape"]],
                counts=[c.reshape(-1) for c in frame["counts"]],
            )
        frame.to_parquet(out, index=False)
    else:
        if args.table == "histograms":
            frame = frame.assign(
                **{
                    name: [json.dumps(list(map(float, a.reshape(-1)))) for a in frame[name]]
                    for name in ("counts", "edges_0", "edges_1")
                },
                shape=[json.dumps(list(s)) for s in frame["shape"]],
            )
        frame.to_csv(out, index=False)
    print(f"wrote {len(frame)} {args.table} rows to {out}")
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    run_dir = _require_run(args.run)
    merged = compact(run_dir)
    for table, count in merged.items():
        if count:
            print(f"{table}: merged {count} files")
        else:
            print(f"{table}: nothing to compact")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    root = _require_root(args.root)
    try:
        app = importlib.import_module("app")
    except ImportError as exc:
        raise _CliError(f"the dashboard is not available: cannot import app ({exc})") from exc
    serve = getattr(app, "serve", None)
    if not callable(serve):
        raise _CliError("the dashboard is not available: the app package has no serve() function")
    result = serve(root, host=args.host, port=args.port, refresh_s=args.refresh)
    return int(result) if isinstance(result, int) else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cockpit", description="Inspect cockpit training logs and serve the live dashboard."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = commands.add_parser("ls", help="list the runs under a log root")
    ls.add_argument("root", help="log root (a directory of run directories)")
    ls.set_defaults(func=_cmd_ls)

    summary = commands.add_parser("summary", help="last/min/max of each metric, and the events")
    summary.add_argument("run", help="run directory")
    summary.set_defaults(func=_cmd_summary)

    export = commands.add_parser("export", help="write one table of a run to one file")
    export.add_argument("run", help="run directory")
    export.add_argument("--format", choices=("csv", "parquet"), required=True)
    export.add_argument("--out", required=True, help="output file")
    export.add_argument("--table", choices=TABLES, default="scalars")
    export.set_defaults(func=_cmd_export)

    compact_cmd = commands.add_parser("compact", help="merge a run's segments (safe while live)")
    compact_cmd.add_argument("run", help="run directory")
    compact_cmd.set_defaults(func=_cmd_compact)

    dashboard = commands.add_parser("dashboard", help="serve the live dashboard")
    dashboard.add_argument("root", help="log root")
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8050)
    dashboard.add_argument("--refresh", type=float, default=2.0, help="seconds between updates")
    dashboard.set_defaults(func=_cmd_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cockpit`` command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The exit status: 0 on success, 2 on usage errors and missing runs.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.cli import main
        >>> from cockpit.logwriter import LogWriter
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with LogWriter(Path(tmp) / "run") as writer:
        ...         writer.add_scalar(0, "loss", "loss", "all", 0.5)
        ...     out = str(Path(tmp) / "loss.csv")
        ...     status = main(["export", str(Path(tmp) / "run"), "--format", "csv", "--out", out])
        ...     csv = Path(out).read_text().splitlines()
        wrote 1 scalars rows to .../loss.csv
        >>> status, csv[0]
        (0, 'step,wall_time,instrument,metric,param,value')
        >>> main(["summary", "no/such/run"])  # the message goes to stderr
        2
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (_CliError, FileNotFoundError, NotADirectoryError, SchemaVersionError) as exc:
        print(f"cockpit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
