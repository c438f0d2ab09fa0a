"""Reading cockpit logs: whole runs, new rows only (for live views), and run listings.

All readers work on live, crashed, finished and compacted runs (see
:mod:`cockpit.schema` for the layout). They list a table directory once, keep
the files that are not superseded by a compacted file, and read only those, so
they never see a row twice or miss one, even while :func:`cockpit.logwriter.compact`
rewrites the run: if a file disappears between listing and reading, they list
again. Temp files (``.``-prefixed) are ignored; a segment that cannot be read
is skipped with a warning naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cockpit import schema
from cockpit.schema import (
    END_FILE,
    LOCK_FILE,
    META_FILE,
    SCHEMAS,
    TABLES,
    Segment,
)

__all__ = [
    "LogTail",
    "last_step",
    "list_runs",
    "read_events",
    "read_histograms",
    "read_log",
    "read_meta",
    "run_status",
]

_LISTING_ATTEMPTS = 5
_READ_ATTEMPTS = 50


# ---------------------------------------------------------------------------
# Listing and reading segment files
# ---------------------------------------------------------------------------


def _stable_listing(table_dir: Path, start: int = 0) -> tuple[list[Segment], list[Segment]]:
    """List a table directory until the visible segments have no gap from ``start`` on.

    A directory listing is not a snapshot: one that races with a rename can
    miss a file. Segment numbers have no gaps, so a gap means "list again". A
    gap that persists (a deleted segment) is accepted with a warning.

    Returns:
        ``(visible, all)``: the segments to read, and every segment file listed
        (files ending before ``start`` are left out of both).
    """
    for attempt in range(_LISTING_ATTEMPTS):
        every = schema.list_segments(table_dir, min_hi=start)
        visible = schema.visible_segments(every)
        gaps = schema.find_gaps(visible, start)
        if not gaps:
            return visible, every
        time.sleep(0.002 * attempt)
    missing = ", ".join(f"{lo}..{hi}" if lo != hi else str(lo) for lo, hi in gaps)
    warnings.warn(
        f"cockpit log: {table_dir} has no file for segment(s) {missing}; their rows are missing",
        RuntimeWarning,
        stacklevel=3,
    )
    return visible, every


def _read_segment_file(
    segment: Segment, table_name: str, columns: list[str] | None = None
) -> tuple[pa.Table, list[tuple[int, int, int]]]:
    """Read one segment file and its segment map, checking version and columns.

    Raises:
        FileNotFoundError: If the file is gone (e.g. compacted away meanwhile).
        SchemaVersionError: If the file is newer than this reader.
        Exception: Anything pyarrow raises for an unreadable file.
    """
    expected = SCHEMAS[table_name]
    with pq.ParquetFile(segment.path) as parquet_file:
        file_schema = parquet_file.schema_arrow
        schema.file_schema_version(file_schema, segment.path)
        missing = [name for name in expected.names if name not in file_schema.names]
        if missing:
            raise ValueError(f"{segment.path} lacks the column(s) {missing}")
        table = parquet_file.read(columns=columns, use_threads=False)
        num_rows = parquet_file.metadata.num_rows
    entries = schema.segment_map(file_schema, segment, num_rows)
    target = expected if columns is None else pa.schema([expected.field(c) for c in columns])
    target = target.remove_metadata()
    if not table.schema.equals(target, check_metadata=False):
        table = table.cast(target)
    return table.replace_schema_metadata(None), entries


def _warn_unreadable(path: Path, exc: BaseException) -> None:
    warnings.warn(
        f"cockpit log: skipping unreadable segment {path} ({type(exc).__name__}: {exc})",
        RuntimeWarning,
        stacklevel=4,
    )


class _Retry(Exception):
    """A file vanished between listing and reading: list again."""


def _read_table(
    run_dir: Path,
    table_name: str,
    columns: list[str] | None = None,
    filter_expr: pc.Expression | None = None,
) -> pa.Table:
    """Read the visible segments of one table into one Arrow table (segment order)."""
    if not run_dir.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such run directory", str(run_dir))
    names = list(columns) if columns is not None else list(SCHEMAS[table_name].names)
    table_dir = run_dir / table_name
    for _ in range(_READ_ATTEMPTS):
        segments, _every = _stable_listing(table_dir)
        if not segments:
            return _empty_table(table_name, names)
        try:
            return _read_fast(segments, table_name, names, filter_expr)
        except schema.SchemaVersionError:
            raise
        except Exception:  # noqa: BLE001 - sorted out file by file below
            if not all(seg.path.exists() for seg in segments):
                continue  # compaction replaced files meanwhile
        try:
            return _read_one_by_one(segments, table_name, names, filter_expr)
        except _Retry:
            continue
    raise RuntimeError(f"cockpit log: {table_dir} kept changing while it was read; try again")


def _read_fast(
    segments: list[Segment],
    table_name: str,
    names: list[str],
    filter_expr: pc.Expression | None,
) -> pa.Table:
    """Read all segments with one multi-threaded dataset scan."""
    dataset = ds.dataset(
        [str(seg.path) for seg in segments],
        schema=SCHEMAS[table_name].remove_metadata(),
        format="parquet",
    )
    table = dataset.to_table(columns=names, filter=filter_expr)
    # The run's newest file carries the highest schema version of the run.
    try:
        newest = pq.read_schema(segments[-1].path)
    except FileNotFoundError:
        pass
    else:
        schema.file_schema_version(newest, segments[-1].path)
    return table


def _read_one_by_one(
    segments: list[Segment],
    table_name: str,
    names: list[str],
    filter_expr: pc.Expression | None,
) -> pa.Table:
    tables = []
    for seg in segments:
        try:
            table, _ = _read_segment_file(seg, table_name, names)
        except FileNotFoundError:
            raise _Retry() from None
        except schema.SchemaVersionError:
            raise
        except Exception as exc:  # noqa: BLE001 - skip anything unreadable
            _warn_unreadable(seg.path, exc)
            continue
        if filter_expr is not None:
            table = table.filter(filter_expr)
        tables.append(table)
    if not tables:
        return _empty_table(table_name, names)
    return pa.concat_tables(tables)


def _empty_table(table_name: str, names: list[str]) -> pa.Table:
    return SCHEMAS[table_name].remove_metadata().empty_table().select(names)


def _sort_by_step(table: pa.Table) -> pa.Table:
    """Stable sort by step (skipped when the rows already are in step order)."""
    if table.num_rows < 2:
        return table
    steps = table.column("step").to_numpy()
    if bool(np.all(steps[1:] >= steps[:-1])):
        return table
    return table.take(pc.sort_indices(table, sort_keys=[("step", "ascending")]))


def _check_run(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such run directory", str(run_dir))
    meta_path = run_dir / META_FILE
    if meta_path.exists():
        read_meta(run_dir)  # raises for a newer schema version
    return run_dir


# ---------------------------------------------------------------------------
# Conversion to pandas
# ---------------------------------------------------------------------------


def _list_rows(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Split a list<...> column into one numpy array per row (views of one writable buffer)."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False, writable=True)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]


def _histograms_to_pandas(table: pa.Table) -> pd.DataFrame:
    plain = [c for c in ("step", "wall_time", "instrument", "param") if c in table.column_names]
    frame = table.select(plain).to_pandas()
    if table.num_rows == 0:
        for name in ("shape", "counts", "edges_0", "edges_1"):
            frame[name] = pd.Series([], dtype=object)
        return frame
    shapes = [tuple(int(d) for d in s) for s in _list_rows(table.column("shape"))]
    counts = _list_rows(table.column("counts"))
    frame["shape"] = pd.Series(shapes, dtype=object, index=frame.index)
    frame["counts"] = pd.Series(
        [c.reshape(s) for c, s in zip(counts, shapes, strict=True)], dtype=object, index=frame.index
    )
    frame["edges_0"] = pd.Series(
        _list_rows(table.column("edges_0")), dtype=object, index=frame.index
    )
    frame["edges_1"] = pd.Series(
        _list_rows(table.column("edges_1")), dtype=object, index=frame.index
    )
    return frame


def _to_pandas(table_name: str, table: pa.Table) -> pd.DataFrame:
    if table_name == "histograms":
        return _histograms_to_pandas(table)
    return table.to_pandas()


def _as_list(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


# ---------------------------------------------------------------------------
# Public readers
# ---------------------------------------------------------------------------


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Return the run's ``meta.json``.

    Raises:
        FileNotFoundError: If the run has no ``meta.json``.
        SchemaVersionError: If the run was written by a newer schema version.
        ValueError: If ``meta.json`` is not a JSON object.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> from cockpit.logreader import read_meta
        >>> tmp = tempfile.TemporaryDirectory()
        >>> run = Path(tmp.name) / "sgd"
        >>> with LogWriter(run, {"tags": {"lr": 0.1}}) as writer:
        ...     for step in range(3):
        ...         writer.add_scalars(step, [("loss", "loss", "all", 1.0 / (step + 1)),
        ...                                   ("grad_norm", "grad_norm", "0.weight", 0.5)])
        >>> meta = read_meta(run)
        >>> meta["run_id"], meta["tags"], meta["schema_version"]
        ('sgd', {'lr': 0.1}, 1)
        >>> tmp.cleanup()
    """
    path = Path(run_dir) / META_FILE
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no run metadata", str(path)) from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    schema.check_schema_version(meta.get("schema_version", 1), path)
    return meta


def read_log(
    run_dir: str | os.PathLike,
    since_step: int | None = None,
    instruments: str | Iterable[str] | None = None,
) -> pd.DataFrame:
    """Read the scalar rows of a run.

    Args:
        run_dir: The run directory.
        since_step: Only rows with ``step >= since_step``.
        instruments: Only rows of this instrument or these instruments.

    Returns:
        Columns ``step, wall_time, instrument, metric, param, value``, sorted by
        step; rows of the same step keep the order they were logged in.

    Raises:
        FileNotFoundError: If ``run_dir`` does not exist.
        SchemaVersionError: If the run was written by a newer schema version.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> from cockpit.logreader import read_log
        >>> tmp = tempfile.TemporaryDirectory()
        >>> run = Path(tmp.name) / "sgd"
        >>> with LogWriter(run) as writer:
        ...     for step in range(3):
        ...         writer.add_scalars(step, [("loss", "loss", "all", 1.0 / (step + 1)),
        ...                                   ("grad_norm", "grad_norm", "0.weight", 0.5)])
        >>> df = read_log(run, since_step=1)
        >>> for row in df.itertuples():
        ...     print(row.step, row.instrument, row.metric, row.param, round(row.value, 3))
        1 loss loss all 0.5
        1 grad_norm grad_norm 0.weight 0.5
        2 loss loss all 0.333
        2 grad_norm grad_norm 0.weight 0.5
        >>> read_log(run, instruments="loss").value.round(3).tolist()
        [1.0, 0.5, 0.333]
        >>> tmp.cleanup()
    """
    run_dir = _check_run(run_dir)
    filter_expr = None
    if since_step is not None:
        filter_expr = pc.field("step") >= int(since_step)
    if instruments is not None:
        wanted = pc.field("instrument").isin(_as_list(instruments))
        filter_expr = wanted if filter_expr is None else filter_expr & wanted
    table = _read_table(run_dir, "scalars", filter_expr=filter_expr)
    return _sort_by_step(table).to_pandas()


def read_histograms(
    run_dir: str | os.PathLike,
    since_step: int | None = None,
    instrument: str | None = None,
    param: str | None = None,
) -> pd.DataFrame:
    """Read the histograms of a run.

    Args:
        run_dir: The run directory.
        since_step: Only rows with ``step >= since_step``.
        instrument: Only this instrument (e.g. ``"grad_hist_1d"``).
        param: Only this parameter.

    Returns:
        Columns ``step, wall_time, instrument, param, shape, counts, edges_0,
        edges_1``, sorted by step: ``shape`` is a tuple, ``counts`` a numpy
        array of that shape, the edges 1D numpy arrays (``edges_1`` is empty
        for 1D histograms).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> import numpy as np
        >>> from cockpit.logreader import read_histograms
        >>> tmp = tempfile.TemporaryDirectory()
        >>> run = Path(tmp.name) / "run"
        >>> counts, edges = np.histogram([0.1, 0.2, -0.5], bins=4, range=(-1, 1))
        >>> with LogWriter(run) as writer:
        ...     writer.add_histogram(0, "grad_hist_1d", "all", counts, [edges])
        >>> h = read_histograms(run, instrument="grad_hist_1d").iloc[0]
        >>> h["shape"], h.counts.tolist(), h.edges_0.tolist(), len(h.edges_1)
        ((4,), [0.0, 1.0, 2.0, 0.0], [-1.0, -0.5, 0.0, 0.5, 1.0], 0)
        >>> tmp.cleanup()
    """
    run_dir = _check_run(run_dir)
    filters = []
    if since_step is not None:
        filters.append(pc.field("step") >= int(since_step))
    if instrument is not None:
        filters.append(pc.field("instrument") == instrument)
    if param is not None:
        filters.append(pc.field("param") == param)
    filter_expr = None
    for expr in filters:
        filter_expr = expr if filter_expr is None else filter_expr & expr
    table = _read_table(run_dir, "histograms", filter_expr=filter_expr)
    return _histograms_to_pandas(_sort_by_step(table))


def read_events(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Read the events of a run: columns ``step, wall_time, level, instrument, message``.

    Rows are in the order they were logged (``wall_time`` order).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> from cockpit.logreader import read_events
        >>> tmp = tempfile.TemporaryDirectory()
        >>> run = Path(tmp.name) / "run"
        >>> with LogWriter(run) as writer:
        ...     writer.add_event("warning", "loss is NaN", step=7, instrument="loss")
        >>> read_events(run)[["step", "level", "instrument", "message"]].values.tolist()
        [[7, 'warning', 'loss', 'loss is NaN']]
        >>> tmp.cleanup()
    """
    run_dir = _check_run(run_dir)
    table = _read_table(run_dir, "events")
    if table.num_rows > 1:
        table = table.take(pc.sort_indices(table, sort_keys=[("wall_time", "ascending")]))
    return table.to_pandas()


def last_step(run_dir: str | os.PathLike) -> int | None:
    """The highest step a run has on disk (scalars and histograms), or None if none.

    Reads only the ``step`` column of each table's newest segment file (steps grow
    with segment numbers), so it is quick on long runs. The Cockpit uses it to refuse
    steps that an existing run directory already holds.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> run = Path(tmp.name) / "run"
        >>> with LogWriter(run) as writer:
        ...     for step in (0, 5, 9):
        ...         writer.add_scalar(step, "loss", "loss", "all", 1.0)
        >>> last_step(run), last_step(Path(tmp.name) / "empty")
        (9, None)
        >>> tmp.cleanup()
    """
    run_dir = Path(run_dir)
    best: int | None = None
    for table_name in ("scalars", "histograms"):
        segments = sorted(schema.list_segments(run_dir / table_name), key=lambda s: s.hi)
        for seg in reversed(segments):  # the newest readable one
            try:
                steps = pq.read_table(seg.path, columns=["step"]).column("step")
            except (OSError, pa.ArrowException) as exc:
                _warn_unreadable(seg.path, exc)
                continue
            if len(steps):
                top = int(pc.max(steps).as_py())
                best = top if best is None else max(best, top)
                break
    return best


def run_status(run_dir: str | os.PathLike) -> str:
    """Return a run's status: ``"finished"``, ``"live"`` or ``"crashed"``.

    ``"finished"`` when ``END`` exists, ``"live"`` when ``LOCK`` names a live
    process, ``"crashed"`` otherwise.

    A ``LOCK`` written on another host counts as live: its process cannot be checked.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> from cockpit.logreader import run_status
        >>> tmp = tempfile.TemporaryDirectory()
        >>> writer = LogWriter(Path(tmp.name) / "run")
        >>> run_status(Path(tmp.name) / "run")  # LOCK names this live process
        'live'
        >>> writer.close()
        >>> run_status(Path(tmp.name) / "run")  # END written
        'finished'
        >>> tmp.cleanup()
    """
    from cockpit.logwriter import _lock_is_stale, _read_lock

    run_dir = Path(run_dir)
    if (run_dir / END_FILE).exists():
        return "finished"
    info = _read_lock(run_dir / LOCK_FILE)
    if info is None:
        return "crashed"
    if not info:
        return "live"  # being created right now
    return "crashed" if _lock_is_stale(info) else "live"


def list_runs(root: str | os.PathLike) -> pd.DataFrame:
    """List the runs under a log root.

    A run is a sub-directory holding ``meta.json`` or a table directory.
    Runs written by a newer schema version are skipped with a warning.

    Args:
        root: The log root.

    Returns:
        One row per run, oldest first, with columns ``run_id``, ``path``,
        ``status`` (``live``/``finished``/``crashed``, see :func:`run_status`),
        ``steps`` (highest logged scalar step + 1, i.e. how far training got;
        0 without scalars), ``last_update`` (unix seconds: mtime of the newest
        segment or of ``meta.json``), ``start_time`` and ``tags`` (from ``meta.json``).

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is not a directory.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> from cockpit.logreader import list_runs
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for name, steps in [("adam", 2), ("sgd", 5)]:
        ...     with LogWriter(Path(tmp.name) / name, {"tags": {"opt": name}}) as writer:
        ...         for step in range(steps):
        ...             writer.add_scalar(step, "loss", "loss", "all", 1.0)
        >>> list_runs(tmp.name)[["run_id", "status", "steps", "tags"]].values.tolist()
        [['adam', 'finished', 2, {'opt': 'adam'}], ['sgd', 'finished', 5, {'opt': 'sgd'}]]
        >>> tmp.cleanup()
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(errno.ENOENT, "no such log root", str(root))
    if not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the log root is not a directory", str(root))
    rows = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        run_dir = Path(entry.path)
        has_meta = (run_dir / META_FILE).exists()
        if not has_meta and not any((run_dir / t).is_dir() for t in TABLES):
            continue
        meta: dict[str, Any] = {}
        try:
            if has_meta:
                meta = read_meta(run_dir)
        except schema.SchemaVersionError as exc:
            warnings.warn(f"cockpit log: skipping run: {exc}", RuntimeWarning, stacklevel=2)
            continue
        except (OSError, ValueError) as exc:
            warnings.warn(
                f"cockpit log: {run_dir}: unreadable metadata ({exc})", RuntimeWarning, stacklevel=2
            )
        try:
            steps_table = _read_table(run_dir, "scalars", columns=["step"])
        except schema.SchemaVersionError as exc:
            warnings.warn(f"cockpit log: skipping run: {exc}", RuntimeWarning, stacklevel=2)
            continue
        steps = 0
        if steps_table.num_rows:
            steps = int(pc.max(steps_table.column("step")).as_py()) + 1
        rows.append(
            {
                "run_id": entry.name,
                "path": run_dir,
                "status": run_status(run_dir),
                "steps": steps,
                "last_update": _last_update(run_dir),
                "start_time": meta.get("start_time", float("nan")),
                "tags": meta.get("tags", {}),
            }
        )
    columns = ["run_id", "path", "status", "steps", "last_update", "start_time", "tags"]
    frame = pd.DataFrame(rows, columns=columns)
    if len(frame):
        frame = frame.sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)
    frame["steps"] = frame["steps"].astype("int64")
    frame["last_update"] = frame["last_update"].astype("float64")
    frame["start_time"] = frame["start_time"].astype("float64")
    return frame


def _last_update(run_dir: Path) -> float:
    candidates = [run_dir / META_FILE]
    for table_name in TABLES:
        segments = schema.visible_segments(schema.list_segments(run_dir / table_name))
        if segments:
            candidates.append(segments[-1].path)
    mtimes = []
    for path in candidates:
        try:
            mtimes.append(path.stat().st_mtime)
        except OSError:
            pass  # compacted away meanwhile
    return max(mtimes, default=float("nan"))


# ---------------------------------------------------------------------------
# Incremental reading
# ---------------------------------------------------------------------------


class LogTail:
    """Read a table of a run incrementally: each call returns only rows not returned before.

    The cursor is the highest segment number read so far; a call lists the
    table directory once and opens only files holding segments above it. A
    compacted file that covers segments on both sides of the cursor is read and
    sliced with its segment map, so compaction never repeats or drops rows.
    The run directory need not exist yet.

    Args:
        run_dir: The run directory.
        table: ``"scalars"``, ``"histograms"`` or ``"events"``.

    Example:
        Follow a live run: each call returns only what was written since the last one.

        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logreader import LogTail
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> run = Path(tmp.name) / "run"
        >>> tail = LogTail(run)  # the run need not exist yet
        >>> len(tail.read_new())  # an empty DataFrame when nothing is new
        0
        >>> writer = LogWriter(run)
        >>> for step in range(3):
        ...     writer.add_scalar(step, "loss", "loss", "all", 1.0)
        ...     writer.flush()  # one segment per step
        >>> tail.read_new().step.tolist(), tail.cursor  # cursor: the last segment read
        ([0, 1, 2], 2)
        >>> writer.add_scalar(3, "loss", "loss", "all", 0.5)
        >>> writer.close()
        >>> tail.read_new().step.tolist()
        [3]
        >>> tmp.cleanup()
    """

    def __init__(self, run_dir: str | os.PathLike, table: str = "scalars") -> None:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
        self.run_dir = Path(run_dir)
        self.table = table
        self.cursor = -1
        self._table_dir = self.run_dir / table

    def read_new(self) -> pd.DataFrame:
        """Return the rows written since the last call (sorted by step, stable).

        Raises:
            SchemaVersionError: If a new segment was written by a newer schema version.
        """
        for _ in range(_READ_ATTEMPTS):
            segments, _every = _stable_listing(self._table_dir, start=self.cursor + 1)
            new = [seg for seg in segments if seg.hi > self.cursor]
            if not new:
                return _to_pandas(
                    self.table, _empty_table(self.table, list(SCHEMAS[self.table].names))
                )
            try:
                table = self._read(new)
            except _Retry:
                continue
            self.cursor = new[-1].hi
            return _to_pandas(self.table, _sort_by_step(table))
        raise RuntimeError(f"cockpit log: {self._table_dir} kept changing while it was read")

    def _read(self, segments: list[Segment]) -> pa.Table:
        tables = []
        for seg in segments:
            try:
                table, entries = _read_segment_file(seg, self.table)
            except FileNotFoundError:
                raise _Retry() from None
            except schema.SchemaVersionError:
                raise
            except Exception as exc:  # noqa: BLE001 - skip anything unreadable
                _warn_unreadable(seg.path, exc)
                continue
            if seg.lo <= self.cursor:
                # Compacted over the cursor: keep the rows of segments after it.
                offset = 0
                for _lo, hi, n_rows in entries:
                    if hi > self.cursor:
                        break
                    offset += n_rows
                table = table.slice(offset)
            tables.append(table)
        if not tables:
            return _empty_table(self.table, list(SCHEMAS[self.table].names))
        return pa.concat_tables(tables)
