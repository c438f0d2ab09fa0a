"""Run discovery, path safety and incremental reading of a log root for the dashboard.

The dashboard serves the runs under one *log root* (see :mod:`cockpit.schema`). Every run id
that comes from a client (URL query, dropdown value, API path) goes through
:func:`resolve_run`, which accepts only the name of a run directory directly under the root:
no separators, no ``..``, no absolute paths, no dot names, and the fully resolved path (symlinks
followed) must still be a child of the resolved root. Anything else is :class:`RunNotFound`
(an HTTP 404 for the API).

Reading is incremental and shared. A :class:`LogCache` keeps, per run, a :class:`RunLog`: one
:class:`~cockpit.logreader.LogTail` per table (the first read of a table is one multi-threaded
Parquet scan, streamed batch by batch with the string columns dictionary-encoded) plus the rows
read so far, split into *buckets* by ``(instrument, param)`` and held as plain numpy arrays
(chunks merged like a binary counter, so a refresh never copies a whole bucket). Only the
buckets named by the cache's ``keep`` are held: the dashboard passes what its panels and hints
read (:func:`app.callbacks.needed_reads`), so e.g. per-tensor distances no panel shows are
dropped as they are read. Every row remembers the tail cursor (the highest segment number
read) at which it arrived, so

* a **client cursor** is ``{"epoch", "scalars", "histograms"}``: the run's identity and the
  table cursors of the client's last update. It lives in the browser (a ``dcc.Store``), never
  on the server;
* :meth:`RunLog.new_rows` / :meth:`RunLog.new_series` return exactly the rows with
  ``since < cursor <= upto``: O(new rows);
* :meth:`RunLog.frame` returns whole buckets and :meth:`RunLog.tail` their last rows, from
  rows shared by all clients, so a page load does not re-read what another client read.

The cache is thread-safe (a lock per run, one for the run table) and bounded: runs are dropped,
least recently used first, once the rows held exceed ``max_bytes`` (a dropped run is simply
read again on its next use; client cursors stay valid because segment numbers are stable).
A run directory that disappears raises :class:`RunGone`; one that was deleted and created
anew (a new inode or ``start_time``) gets a new epoch, and clients holding the old epoch
rebuild their figures.

Frames use the log schema of :mod:`app.transforms`, with ``instrument``, ``metric`` and
``param`` as pandas categoricals (compact, and fast to compare).
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cockpit import schema
from cockpit.logreader import LogTail, run_status
from cockpit.schema import META_FILE, SCHEMAS, TABLES

__all__ = [
    "Cursor",
    "LogCache",
    "RunGone",
    "RunInfo",
    "RunLog",
    "RunNotFound",
    "check_root",
    "discover_runs",
    "empty_frame",
    "resolve_run",
]

#: The tables the dashboard reads.
READ_TABLES = ("scalars", "histograms")
_SCALAR_COLUMNS = ("step", "wall_time", "instrument", "metric", "param", "value")
_HIST_COLUMNS = (
    "step",
    "wall_time",
    "instrument",
    "param",
    "shape",
    "counts",
    "edges_0",
    "edges_1",
)
_COLUMNS = {"scalars": _SCALAR_COLUMNS, "histograms": _HIST_COLUMNS}
_CATEGORICAL = ("instrument", "metric", "param")
#: Upper bound on a bucket's chunks (a chunk arrives per refresh; merges keep them fewer).
_MAX_CHUNKS = 64
_SCALAR_ROW_BYTES = 40
#: ``(table, instrument, param)``: rows a panel reads; ``param=None`` means every param.
Read = tuple[str, str, "str | None"]


class RunNotFound(LookupError):
    """A run id that is not the name of a run directory directly under the log root.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> with LogWriter(root / "sgd") as writer:
        ...     writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> from app.data import RunNotFound, resolve_run
        >>> for run_id in ["../etc", "/etc", ".hidden", "missing"]:
        ...     try:
        ...         resolve_run(root, run_id)
        ...     except RunNotFound as exc:
        ...         print(exc)
        no run '../etc'
        no run '/etc'
        no run '.hidden'
        no run 'missing'
        >>> tmp.cleanup()
    """


class RunGone(RunNotFound):
    """The run directory was deleted (or replaced by something else) after it was opened.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> with LogWriter(root / "sgd") as writer:
        ...     writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> import shutil
        >>> from app.data import LogCache, RunGone
        >>> cache = LogCache(root)
        >>> log, cursor = cache.get("sgd")
        >>> shutil.rmtree(root / "sgd")  # deleted while the dashboard shows it
        >>> try:
        ...     cache.get("sgd")
        ... except RunGone as exc:
        ...     print(exc)
        run 'sgd' was deleted
        >>> tmp.cleanup()
    """


class Cursor(TypedDict):
    """What a client has seen of one run (JSON, kept in the browser).

    Attributes:
        epoch: The run's identity when the rows were read; a different epoch means the
            directory was deleted and created anew, so the client must start over.
        scalars: Tail cursor (highest segment number read) of the scalars table, ``-1``: none.
        histograms: Tail cursor of the histograms table.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> with LogWriter(root / "sgd") as writer:
        ...     writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> from app.data import LogCache
        >>> log, cursor = LogCache(root).get("sgd")
        >>> sorted(cursor), cursor["scalars"], cursor["histograms"]  # -1: nothing read
        (['epoch', 'histograms', 'scalars'], 0, -1)
        >>> tmp.cleanup()

    """

    epoch: str
    scalars: int
    histograms: int


@dataclass(frozen=True)
class RunInfo:
    """One run under the root, as the run selector shows it.

    Attributes:
        run_id: The run directory's name.
        status: ``"live"``, ``"finished"`` or ``"crashed"`` (see
            :func:`cockpit.logreader.run_status`).
        start_time: Unix seconds from ``meta.json`` (NaN when unknown).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> with LogWriter(root / "b") as writer:
        ...     writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> with LogWriter(root / "a") as writer:
        ...     writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> from app.data import discover_runs
        >>> [(r.run_id, r.status) for r in discover_runs(root)]  # oldest first
        [('b', 'finished'), ('a', 'finished')]
        >>> tmp.cleanup()

    """

    run_id: str
    status: str
    start_time: float


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------
def check_root(root: str | os.PathLike) -> Path:
    """Resolve the log root, failing clearly when it is unusable.

    Args:
        root: The log root.

    Returns:
        The resolved (absolute, symlink-free) root.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is not a directory.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> from app.data import check_root
        >>> check_root(root) == root.resolve()
        True
        >>> check_root(root / "missing")
        Traceback (most recent call last):
        ...
        FileNotFoundError: log root '...missing' does not exist
        >>> tmp.cleanup()

    """
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"log root {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"log root {str(path)!r} is not a directory")
    return Path(os.path.realpath(path))


def _is_run_dir(path: Path) -> bool:
    """The rule of :func:`cockpit.logreader.list_runs`: ``meta.json`` or a table directory."""
    return (path / META_FILE).is_file() or any((path / t).is_dir() for t in TABLES)


def resolve_run(root: str | os.PathLike, run_id: object) -> Path:
    """The directory of run ``run_id`` under ``root``; refuses everything else.

    Args:
        root: The log root (resolved or not).
        run_id: Untrusted run id, e.g. from a URL.

    Returns:
        The run directory, fully resolved, whose parent is the resolved root.

    Raises:
        RunNotFound: If ``run_id`` is not a plain name, escapes the root (``..``, an absolute
            path, a symlink pointing elsewhere), or is not a run directory.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> with LogWriter(root / "sgd") as writer:
        ...     writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> from app.data import RunNotFound, resolve_run
        >>> resolve_run(root, "sgd") == (root / "sgd").resolve()
        True
        >>> (root / "notes").mkdir()  # a directory, but not a run
        >>> resolve_run(root, "notes")
        Traceback (most recent call last):
        ...
        app.data.RunNotFound: no run 'notes'
        >>> tmp.cleanup()

    """
    if (
        not isinstance(run_id, str)
        or not run_id
        or run_id.startswith(".")
        or any(c in run_id for c in ("/", "\\", "\x00"))
        or os.path.isabs(run_id)
        or len(run_id) > 255
    ):
        raise RunNotFound(f"no run {run_id!r}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, run_id))
    if os.path.dirname(real) != real_root or not os.path.isdir(real):
        raise RunNotFound(f"no run {run_id!r}")
    path = Path(real)
    if not _is_run_dir(path):
        raise RunNotFound(f"no run {run_id!r}")
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` as a dict, ``{}`` when missing or unreadable (never raises)."""
    try:
        meta = json.loads((path / META_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


class _MetaCache:
    """``meta.json`` contents keyed by path and modification time (bounded, thread-safe)."""

    def __init__(self, size: int = 512) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Path, tuple[int, dict[str, Any]]] = OrderedDict()

    def get(self, path: Path) -> dict[str, Any]:
        try:
            mtime = (path / META_FILE).stat().st_mtime_ns
        except OSError:
            return {}
        with self._lock:
            hit = self._items.get(path)
            if hit is not None and hit[0] == mtime:
                self._items.move_to_end(path)
                return hit[1]
        meta = _read_meta(path)
        with self._lock:
            self._items[path] = (mtime, meta)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return meta


def discover_runs(root: str | os.PathLike, meta_cache: _MetaCache | None = None) -> list[RunInfo]:
    """List the runs under ``root`` cheaply (no Parquet reads), oldest first.

    Uses the rule of :func:`cockpit.logreader.list_runs` (a sub-directory with ``meta.json`` or
    a table directory), but skips entries that resolve outside the root (symlinks), so every
    listed id passes :func:`resolve_run`.

    Args:
        root: The log root.
        meta_cache: Optional cache of ``meta.json`` contents.

    Returns:
        The runs, sorted by ``start_time`` then id.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is not a directory.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> with LogWriter(root / "sgd") as writer:
        ...     writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> from app.data import discover_runs
        >>> writer = LogWriter(root / "live")  # still open
        >>> [(r.run_id, r.status) for r in discover_runs(root)]
        [('sgd', 'finished'), ('live', 'live')]
        >>> writer.close()
        >>> tmp.cleanup()

    """
    real_root = check_root(root)
    runs = []
    for entry in os.scandir(real_root):
        if entry.name.startswith("."):
            continue
        try:
            path = resolve_run(real_root, entry.name)
        except RunNotFound:
            continue
        meta = meta_cache.get(path) if meta_cache is not None else _read_meta(path)
        start = meta.get("start_time")
        start = float(start) if isinstance(start, (int, float)) else math.nan
        runs.append(RunInfo(entry.name, run_status(path), start))
    return sorted(runs, key=lambda r: (math.isnan(r.start_time), r.start_time, r.run_id))


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------
def empty_frame(table: str = "scalars") -> pd.DataFrame:
    """An empty frame with the columns of ``table`` (``"scalars"`` or ``"histograms"``).

    Args:
        table: The table name.

    Returns:
        The empty DataFrame.

    Example:
        >>> from app.data import empty_frame
        >>> empty_frame().columns.tolist()
        ['step', 'wall_time', 'instrument', 'metric', 'param', 'value']
        >>> len(empty_frame("histograms")), str(empty_frame().instrument.dtype)
        (0, 'category')

    """
    cols: dict[str, Any] = {}
    for name in _COLUMNS[table]:
        if name == "step":
            cols[name] = np.empty(0, np.int64)
        elif name in ("wall_time", "value"):
            cols[name] = np.empty(0, np.float64)
        elif name in _CATEGORICAL:
            cols[name] = pd.Categorical([])
        else:
            cols[name] = np.empty(0, object)
    return pd.DataFrame(cols)


@functools.lru_cache(maxsize=4096)
def _dtype(names: tuple[str, ...]) -> pd.CategoricalDtype:
    """One shared dtype per category list (building and validating one costs ~0.2 ms)."""
    return pd.CategoricalDtype(list(names))


def _categorical(codes: np.ndarray, names: tuple[str, ...]) -> pd.Categorical:
    return pd.Categorical.from_codes(codes, dtype=_dtype(names), validate=False)


class _Piece(NamedTuple):
    """Rows of one ``(instrument, param)`` bucket as plain arrays.

    Attributes:
        arrays: ``step``, ``wall_time`` and ``value`` (scalars) or ``step``, ``wall_time``,
            ``shape``, ``counts``, ``edges_0``, ``edges_1`` (histograms; object arrays).
        metric: Metric codes into ``names`` (scalars), ``None`` for histograms.
        names: Metric names.
        cursors: The tail cursor at which each row arrived (non-decreasing).
    """

    arrays: dict[str, np.ndarray]
    metric: np.ndarray | None
    names: tuple[str, ...]
    cursors: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.cursors)

    def slice(self, a: int, b: int) -> _Piece:
        if (a, b) == (0, self.rows):
            return self
        return _Piece(
            {k: v[a:b] for k, v in self.arrays.items()},
            None if self.metric is None else self.metric[a:b],
            self.names,
            self.cursors[a:b],
        )


def _join(pieces: Sequence[_Piece]) -> _Piece:
    """Concatenate pieces of one bucket (metric names are unified)."""
    if len(pieces) == 1:
        return pieces[0]
    arrays = {k: np.concatenate([p.arrays[k] for p in pieces]) for k in pieces[0].arrays}
    cursors = np.concatenate([p.cursors for p in pieces])
    if pieces[0].metric is None:
        return _Piece(arrays, None, (), cursors)
    names = pieces[0].names
    if all(p.names == names for p in pieces[1:]):
        return _Piece(arrays, np.concatenate([p.metric for p in pieces]), names, cursors)
    union = tuple(dict.fromkeys(n for p in pieces for n in p.names))
    index = {n: i for i, n in enumerate(union)}
    codes = [np.array([index[n] for n in p.names], np.int32)[p.metric] for p in pieces]
    return _Piece(arrays, np.concatenate(codes), union, cursors)


def _to_frame(parts: Sequence[tuple[str, str, _Piece]], table: str) -> pd.DataFrame:
    """One DataFrame (log schema, categorical names) from bucket pieces."""
    parts = [part for part in parts if part[2].rows]
    if not parts:
        return empty_frame(table)
    insts = tuple(dict.fromkeys(inst for inst, _, _ in parts))
    params = tuple(dict.fromkeys(param for _, param, _ in parts))
    sizes = [piece.rows for _, _, piece in parts]
    cols: dict[str, Any] = {}
    for name in _COLUMNS[table]:
        if name == "instrument":
            codes = np.repeat([insts.index(i) for i, _, _ in parts], sizes).astype(np.int32)
            cols[name] = _categorical(codes, insts)
        elif name == "param":
            codes = np.repeat([params.index(p) for _, p, _ in parts], sizes).astype(np.int32)
            cols[name] = _categorical(codes, params)
        elif name == "metric":
            joined = _join([piece for _, _, piece in parts])
            cols[name] = _categorical(joined.metric, joined.names)
        else:
            cols[name] = np.concatenate([piece.arrays[name] for _, _, piece in parts])
    return pd.DataFrame(cols, copy=False)


class _Columns(NamedTuple):
    """Freshly read rows of one table: plain columns and dictionary-encoded string columns."""

    arrays: dict[str, np.ndarray]
    codes: dict[str, tuple[np.ndarray, list[str]]]

    @property
    def size(self) -> int:
        return len(self.arrays["step"])


def _from_pandas(df: pd.DataFrame, table: str) -> _Columns:
    """Rows as returned by :class:`~cockpit.logreader.LogTail`."""
    arrays = {n: df[n].to_numpy() for n in _COLUMNS[table] if n not in _CATEGORICAL}
    codes = {}
    for name in _CATEGORICAL:
        if name in _COLUMNS[table]:
            c, uniques = pd.factorize(df[name], sort=False)
            codes[name] = (c, [str(u) for u in uniques])
    return _Columns(arrays, codes)


def _list_rows(column: pa.Array, shapes: Sequence[tuple[int, ...]] | None = None) -> np.ndarray:
    """One numpy array per row of a ``list<...>`` array (reshaped to ``shapes`` if given).

    The rows are read-only views of the Arrow buffers (the values are not copied); nothing in
    the app writes into a histogram.
    """
    out = np.empty(len(column), dtype=object)
    offsets = column.offsets.to_numpy().tolist()
    values = column.values.to_numpy(zero_copy_only=False)
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        out[i] = values[a:b] if shapes is None else values[a:b].reshape(shapes[i])
    return out


def _shapes(column: pa.Array) -> np.ndarray:
    """The ``shape`` list column as an object array of tuples."""
    out = np.empty(len(column), dtype=object)
    offsets = column.offsets.to_numpy().tolist()
    dims = column.values.to_numpy(zero_copy_only=False).tolist()
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        out[i] = tuple(dims[a:b])
    return out


def _batch_codes(column: pa.Array) -> tuple[np.ndarray, list[str]]:
    """Indices into a list of names for a string array (dictionary-encoded or plain)."""
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    names = [str(v) for v in column.dictionary.to_pylist()]
    return column.indices.to_numpy(zero_copy_only=False), names


class _ScanRows:
    """The rows of a bulk scan that ``keep`` names, split into buckets batch by batch.

    Each record batch is filtered as it arrives (the string columns are compared per batch on
    their small dictionaries, not per row) and split into ``(instrument, param)`` pieces (see
    :func:`_split`), so unkept rows are never copied, kept rows are copied once more when a
    bucket's pieces are joined, and the numpy work overlaps Arrow decoding the next files in
    its own threads.
    """

    def __init__(self, table: str, keep: Collection[Read] | None) -> None:
        self.table = table
        self.rules = None if keep is None else {(i, p) for t, i, p in keep if t == table}
        self.parts: dict[tuple[str, str], list[tuple[int, int, _Piece]]] = {}
        self.batches = 0
        #: The highest step of all rows read, kept or not.
        self.max_step: int | None = None

    def add(self, segment: int, batch: pa.RecordBatch) -> None:
        """Keep the wanted rows of one batch of segment number ``segment`` (any order)."""
        if batch.num_rows == 0:
            return
        top = int(batch.column("step").to_numpy().max())
        self.max_step = top if self.max_step is None else max(self.max_step, top)
        codes = {
            n: _batch_codes(batch.column(n)) for n in _CATEGORICAL if n in _COLUMNS[self.table]
        }
        rows = None
        if self.rules is not None:
            (inst_idx, insts), (param_idx, params) = codes["instrument"], codes["param"]
            ok = np.array(
                [[(i, None) in self.rules or (i, p) in self.rules for p in params] for i in insts],
                dtype=bool,
            ).reshape(len(insts), len(params))
            if not ok.all():
                rows = np.flatnonzero(ok[inst_idx, param_idx])
                if rows.size == 0:
                    return
                codes = {n: (indices[rows], names) for n, (indices, names) in codes.items()}
        arrays: dict[str, np.ndarray] = {}
        shapes = _shapes(batch.column("shape")) if "shape" in _COLUMNS[self.table] else None
        for name in _COLUMNS[self.table]:
            if name in codes:
                continue
            if name == "shape":
                values = shapes
            elif name == "counts":
                values = _list_rows(batch.column(name), shapes)
            elif name in ("edges_0", "edges_1"):
                values = _list_rows(batch.column(name))
            else:
                values = batch.column(name).to_numpy(zero_copy_only=False)
            arrays[name] = values if rows is None else values[rows]
        self.batches += 1
        pieces = _split(_Columns(arrays, codes), self.table, compact_metrics=False)
        for key, piece in pieces.items():
            self.parts.setdefault(key, []).append((segment, self.batches, piece))

    def buckets(self) -> dict[tuple[str, str], _Piece]:
        """Each bucket's rows, in segment order (and batch order within a segment)."""
        return {
            key: _compact_metrics(
                _join([piece for _, _, piece in sorted(parts, key=lambda part: part[:2])])
            )
            for key, parts in self.parts.items()
        }


class _Scan(NamedTuple):
    """What :func:`_bulk_read` read: the kept rows by bucket, the highest step, the cursor."""

    buckets: dict[tuple[str, str], _Piece]
    max_step: int | None
    cursor: int


@functools.lru_cache(maxsize=None)
def _scan_format(table: str) -> tuple[pa.Schema, ds.ParquetFileFormat]:
    """Schema and format of a bulk scan: the string columns read dictionary-encoded."""
    plain = SCHEMAS[table].remove_metadata()
    names = [n for n in _CATEGORICAL if n in plain.names]
    fields = [
        pa.field(f.name, pa.dictionary(pa.int32(), pa.string()), f.nullable)
        if f.name in names
        else f
        for f in plain
    ]
    read_options = ds.ParquetReadOptions(dictionary_columns=names)
    return pa.schema(fields), ds.ParquetFileFormat(read_options=read_options)


def _bulk_read(run_dir: Path, table: str, keep: Collection[Read] | None = None) -> _Scan | None:
    """Read a whole table with one multi-threaded scan, split into buckets.

    Used for a run's first read (much faster than file-by-file for long runs). Only the rows of
    the buckets ``keep`` names are kept (see :class:`_ScanRows`; ``None`` keeps all); the
    highest step counts every row. Returns ``None`` when the listing has gaps, a file vanished
    (compaction) or is unreadable: the caller then uses
    :class:`~cockpit.logreader.LogTail`, which retries and warns.

    Raises:
        SchemaVersionError: If the run was written by a newer schema version.
    """
    segments = schema.visible_segments(schema.list_segments(run_dir / table))
    if not segments or schema.find_gaps(segments):
        return None
    scan_schema, scan_format = _scan_format(table)
    paths = [str(seg.path) for seg in segments]
    number = {path: k for k, path in enumerate(paths)}
    rows = _ScanRows(table, keep)
    try:
        schema.file_schema_version(pq.read_schema(segments[-1].path), segments[-1].path)
        scanner = ds.dataset(paths, schema=scan_schema, format=scan_format).scanner()
        for tagged in scanner.scan_batches():
            rows.add(number[tagged.fragment.path], tagged.record_batch)
    except schema.SchemaVersionError:
        raise
    except Exception:  # noqa: BLE001 - the careful reader sorts it out
        return None
    return _Scan(rows.buckets(), rows.max_step, segments[-1].hi)


def _wanted(
    keep: Collection[Read] | None, table: str, insts: Sequence[str], params: Sequence[str]
) -> np.ndarray | None:
    """Which ``(instrument, param)`` key codes to keep (indexed ``inst * len(params) + param``).

    Returns:
        A boolean lookup table, or ``None`` when every key is kept.
    """
    if keep is None:
        return None
    rules = {(inst, param) for t, inst, param in keep if t == table}
    flags = np.array(
        [(i, None) in rules or (i, p) in rules for i in insts for p in params], dtype=bool
    )
    return None if flags.all() else flags


def _split(
    cols: _Columns,
    table: str,
    keep: Collection[Read] | None = None,
    compact_metrics: bool = True,
) -> dict[tuple[str, str], _Piece]:
    """Split freshly read rows into ``(instrument, param)`` buckets, keeping their order.

    O(n): one stable radix sort on a small integer key, one gather per column, then slices.
    Rows of buckets that ``keep`` does not name are dropped first (see :class:`LogCache`).
    ``compact_metrics=False`` leaves each piece with all metric names of ``cols`` (see
    :func:`_compact_metrics`), for pieces that are joined later anyway.
    """
    if cols.size == 0:
        return {}
    inst_codes, insts = cols.codes["instrument"]
    param_codes, params = cols.codes["param"]
    key = inst_codes.astype(np.int64) * len(params) + param_codes
    if len(insts) * len(params) < np.iinfo(np.int16).max:
        key = key.astype(np.int16)  # numpy sorts small ints stably with a radix sort
    wanted = _wanted(keep, table, insts, params)
    if wanted is None:
        order = np.argsort(key, kind="stable")
    else:
        rows = np.flatnonzero(wanted[key])
        order = rows[np.argsort(key[rows], kind="stable")]
    if order.size == 0:
        return {}
    key = key[order]
    bounds = np.flatnonzero(key[1:] != key[:-1]) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [key.size]])
    plain = {name: values[order] for name, values in cols.arrays.items()}
    metric_codes, metric_names = cols.codes.get("metric", (None, []))
    if metric_codes is not None:
        metric_codes = metric_codes[order]
    out: dict[tuple[str, str], _Piece] = {}
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        k = int(key[a])
        arrays = {name: values[a:b] for name, values in plain.items()}
        piece = _Piece(arrays, None, (), np.empty(0, np.int64))
        if metric_codes is not None:
            piece = piece._replace(metric=metric_codes[a:b], names=tuple(metric_names))
            if compact_metrics:
                piece = _compact_metrics(piece)
        out[(insts[k // len(params)], params[k % len(params)])] = piece
    return out


def _compact_metrics(piece: _Piece) -> _Piece:
    """The piece with only the metric names its rows use (codes renumbered in name order)."""
    if piece.metric is None:
        return piece
    used = np.flatnonzero(np.bincount(piece.metric, minlength=len(piece.names)))
    if used.size == len(piece.names):
        return piece
    if used.size == 1:
        metric = np.zeros(piece.metric.size, np.int32)
    else:
        remap = np.zeros(len(piece.names), np.int32)
        remap[used] = np.arange(used.size)
        metric = remap[piece.metric]
    return piece._replace(metric=metric, names=tuple(piece.names[i] for i in used))


def _nbytes(piece: _Piece, table: str) -> int:
    """Approximate bytes held by a piece (its ``cursors`` may not be set yet)."""
    rows = len(piece.arrays["step"])
    if table == "scalars":
        return rows * _SCALAR_ROW_BYTES
    cells = sum(c.size for c in piece.arrays["counts"])
    edges = sum(e.size for e in piece.arrays["edges_0"]) + sum(
        e.size for e in piece.arrays["edges_1"]
    )
    return 8 * (cells + edges) + 200 * rows


class _Bucket:
    """The rows of one ``(instrument, param)`` in read order, each with its arrival cursor."""

    __slots__ = ("chunks", "inst", "param")

    def __init__(self, inst: str, param: str) -> None:
        self.inst, self.param = inst, param
        self.chunks: list[_Piece] = []

    def add(self, piece: _Piece, cursor: int) -> None:
        rows = len(piece.arrays["step"])
        self.chunks.append(piece._replace(cursors=np.full(rows, cursor, dtype=np.int64)))
        # Merge like a binary counter: chunk sizes stay geometric, so there are O(log n)
        # chunks and each row is copied O(log n) times, never the whole bucket per refresh.
        while len(self.chunks) > 1 and self.chunks[-2].rows <= 2 * self.chunks[-1].rows:
            self._merge(len(self.chunks) - 2)
        if len(self.chunks) > _MAX_CHUNKS:
            self._merge(1)

    def _merge(self, start: int = 0) -> None:
        """Merge ``chunks[start:]`` into one chunk."""
        if len(self.chunks) - start > 1:
            self.chunks = self.chunks[:start] + [_join(self.chunks[start:])]

    def rows(self, lo: int, hi: int) -> list[_Piece]:
        """Pieces holding the rows that arrived with ``lo < cursor <= hi``."""
        out = []
        for piece in reversed(self.chunks):
            if piece.cursors[-1] <= lo:
                break
            a = int(np.searchsorted(piece.cursors, lo, side="right"))
            b = int(np.searchsorted(piece.cursors, hi, side="right"))
            if b > a:
                out.append(piece.slice(a, b))
        out.reverse()
        return out

    def tail(self, n: int, hi: int) -> list[_Piece]:
        """Pieces holding the last ``n`` rows (in read order) that arrived with ``cursor <= hi``."""
        pieces = []
        for piece in reversed(self.chunks):
            b = int(np.searchsorted(piece.cursors, hi, side="right"))
            if b == 0:
                continue
            pieces.append(piece.slice(max(0, b - n), b))
            n -= pieces[-1].rows
            if n <= 0:
                break
        pieces.reverse()
        return pieces

    def arrived(self, lo: int, hi: int) -> bool:
        """Whether any row arrived with ``lo < cursor <= hi``."""
        for piece in reversed(self.chunks):
            if piece.cursors[-1] <= lo:
                return False
            a = int(np.searchsorted(piece.cursors, lo, side="right"))
            if int(np.searchsorted(piece.cursors, hi, side="right")) > a:
                return True
        return False

    def upto(self, hi: int) -> list[_Piece]:
        """All rows that arrived with ``cursor <= hi``, as one piece (merging once)."""
        self._merge()
        if not self.chunks:
            return []
        piece = self.chunks[0]
        return [piece.slice(0, int(np.searchsorted(piece.cursors, hi, side="right")))]


#: ``(instrument, param)``; ``param=None`` means every param of the instrument.
Key = tuple[str, "str | None"]


def _identity(path: Path) -> tuple[int, int]:
    """``(inode, meta.json mtime)`` of a run directory.

    Raises:
        RunGone: If the directory is gone.
    """
    try:
        ino = os.stat(path).st_ino
    except OSError as exc:
        raise RunGone(f"run {path.name!r} was deleted") from exc
    try:
        mtime = (path / META_FILE).stat().st_mtime_ns
    except OSError:
        mtime = 0
    return ino, mtime


class RunLog:
    """What the server has read of one run: incremental tails and bucketed rows.

    Use through :class:`LogCache`. All methods are thread-safe; returned frames are never
    mutated afterwards, so they can be used outside the lock.

    Args:
        run_id: The run id (a name under the root).
        path: The resolved run directory.
        keep: Only rows of these ``(table, instrument, param)`` are held (``param=None``: every
            param); ``None`` holds everything.

    Example:
        A client's cursor selects exactly the rows it has not seen yet:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> from app.data import LogCache
        >>> writer = LogWriter(root / "sgd", {"model": [{"name": "0.weight"}]})
        >>> for step in range(2):
        ...     writer.add_scalars(step, [("loss", "loss", "all", 1.0 / (step + 1)),
        ...                              ("grad_norm", "grad_norm", "0.weight", 0.5)])
        >>> writer.flush()
        >>> cache = LogCache(root, min_refresh_s=0.0)
        >>> log, seen = cache.get("sgd")  # refreshed; seen: the client's cursor
        >>> log.status(), log.params(), seen == log.cursor()
        ('live', ['0.weight'], True)
        >>> loss = log.frame("scalars", [("loss", "all")], seen)
        >>> loss.step.tolist(), loss.value.tolist()
        ([0, 1], [1.0, 0.5])
        >>> writer.add_scalar(2, "loss", "loss", "all", 0.25)
        >>> writer.flush()
        >>> now = log.refresh()
        >>> log.new_rows("scalars", seen, now).step.tolist(), log.touched(seen, now)
        ([2], {('scalars', 'loss', 'all')})
        >>> steps, wall_times, values = log.new_series(seen, now)[("loss", "loss", "all")]
        >>> steps.tolist(), values.tolist()
        ([2], [0.25])
        >>> log.tail("scalars", None, 1, now)[["instrument", "step"]].values.tolist()
        [['loss', 2], ['grad_norm', 1]]
        >>> writer.close()
        >>> tmp.cleanup()
    """

    def __init__(self, run_id: str, path: Path, keep: Collection[Read] | None = None) -> None:
        self.run_id = run_id
        self.path = path
        self.keep = None if keep is None else frozenset(keep)
        self._identity = _identity(path)
        self.meta = _read_meta(path)
        self.epoch = f"{self._identity[0]}:{self.meta.get('start_time', '')}"
        self._lock = threading.Lock()
        self._tails = {t: LogTail(path, t) for t in READ_TABLES}
        self._buckets: dict[str, dict[tuple[str, str], _Bucket]] = {t: {} for t in READ_TABLES}
        self._params: dict[str, dict[str, list[str]]] = {t: {} for t in READ_TABLES}
        self._last_refresh = -math.inf
        self.nbytes = 0
        #: Highest step read so far (``None`` before the first row).
        self.max_step: int | None = None

    @property
    def tracked(self) -> frozenset[str] | None:
        """Instrument names configured for the run (``meta.json``), ``None`` when unknown."""
        names = [i.get("name") for i in self.meta.get("instruments", []) if isinstance(i, dict)]
        return frozenset(n for n in names if isinstance(n, str)) or None

    def cursor(self) -> Cursor:
        """The cursor of everything read so far."""
        with self._lock:
            return self._cursor()

    def _cursor(self) -> Cursor:
        return Cursor(
            epoch=self.epoch,
            scalars=self._tails["scalars"].cursor,
            histograms=self._tails["histograms"].cursor,
        )

    def refresh(self, min_interval_s: float = 0.0) -> Cursor:
        """Read the segments written since the last refresh (at most once per interval).

        Args:
            min_interval_s: Skip the directory listings when the last refresh is more recent.

        Returns:
            The cursor after reading.

        Raises:
            RunGone: If the run directory was deleted or replaced.

        """
        with self._lock:
            now = time.monotonic()
            if now - self._last_refresh < min_interval_s:
                return self._cursor()
            self._check_identity()
            for table in READ_TABLES:
                tail = self._tails[table]
                if tail.cursor < 0:
                    bulk = _bulk_read(self.path, table, self.keep)
                    if bulk is not None:
                        tail.cursor = bulk.cursor
                        self._add_pieces(table, bulk.buckets, bulk.cursor, bulk.max_step)
                new = tail.read_new()
                if len(new):
                    self._add(table, _from_pandas(new, table), tail.cursor)
            self._last_refresh = time.monotonic()
            return self._cursor()

    def _check_identity(self) -> None:
        """Raise :class:`RunGone` if the directory was deleted or replaced by a new run."""
        ino, mtime = _identity(self.path)
        if ino != self._identity[0]:
            raise RunGone(f"run {self.run_id!r} was replaced")
        if mtime != self._identity[1]:  # a writer reopened the run, or a new run took its name
            meta = _read_meta(self.path)
            if meta.get("start_time") != self.meta.get("start_time"):
                raise RunGone(f"run {self.run_id!r} was replaced")
            self.meta, self._identity = meta, (ino, mtime)

    def status(self) -> str:
        """``"live"``, ``"finished"`` or ``"crashed"`` (:func:`cockpit.logreader.run_status`)."""
        return run_status(self.path)

    def _add(self, table: str, new: _Columns, cursor: int) -> None:
        top = int(new.arrays["step"].max()) if new.size else None
        self._add_pieces(table, _split(new, table, self.keep), cursor, top)

    def _add_pieces(
        self, table: str, pieces: dict[tuple[str, str], _Piece], cursor: int, top: int | None
    ) -> None:
        if top is not None:
            self.max_step = top if self.max_step is None else max(self.max_step, top)
        for (inst, param), piece in pieces.items():
            bucket = self._buckets[table].get((inst, param))
            if bucket is None:
                bucket = self._buckets[table][(inst, param)] = _Bucket(inst, param)
                self._params[table].setdefault(inst, []).append(param)
            bucket.add(piece, cursor)
            self.nbytes += _nbytes(piece, table)

    def _select(self, table: str, keys: Iterable[Key] | None) -> list[_Bucket]:
        buckets = self._buckets[table]
        if keys is None:
            return list(buckets.values())
        out, seen = [], set()
        for inst, param in keys:
            params = self._params[table].get(inst, []) if param is None else [param]
            for p in params:
                if (inst, p) in buckets and (inst, p) not in seen:
                    seen.add((inst, p))
                    out.append(buckets[(inst, p)])
        return out

    def frame(self, table: str, keys: Iterable[Key] | None, upto: Cursor) -> pd.DataFrame:
        """All rows of the selected buckets that arrived up to ``upto``.

        Args:
            table: ``"scalars"`` or ``"histograms"``.
            keys: ``(instrument, param)`` pairs (``param=None``: all params); ``None``: all.
            upto: A cursor returned by :meth:`refresh` (a consistent snapshot).

        Returns:
            The rows, bucket by bucket (each in read order); builders sort by step.

        """
        with self._lock:
            parts = [
                (b.inst, b.param, p) for b in self._select(table, keys) for p in b.upto(upto[table])
            ]
        return _to_frame(parts, table)

    def new_rows(
        self, table: str, since: Cursor | None, upto: Cursor, keys: Iterable[Key] | None = None
    ) -> pd.DataFrame:
        """The rows that arrived after ``since`` and up to ``upto``: O(new rows).

        Args:
            table: ``"scalars"`` or ``"histograms"``.
            since: The client's cursor (``None``: from the start).
            upto: A cursor returned by :meth:`refresh`.
            keys: Optional bucket selection, as for :meth:`frame`.

        Returns:
            The new rows.

        """
        lo = -1 if since is None else int(since[table])
        with self._lock:
            parts = [
                (b.inst, b.param, p)
                for b in self._select(table, keys)
                for p in b.rows(lo, upto[table])
            ]
        return _to_frame(parts, table)

    def tail(self, table: str, keys: Iterable[Key] | None, n: int, upto: Cursor) -> pd.DataFrame:
        """The last ``n`` rows of each selected bucket up to ``upto`` (no merging: cheap).

        Args:
            table: ``"scalars"`` or ``"histograms"``.
            keys: Bucket selection, as for :meth:`frame`.
            n: Rows per bucket.
            upto: A cursor returned by :meth:`refresh`.

        Returns:
            The rows.

        """
        with self._lock:
            parts = [
                (b.inst, b.param, p)
                for b in self._select(table, keys)
                for p in b.tail(n, upto[table])
            ]
        return _to_frame(parts, table)

    def new_series(
        self, since: Cursor | None, upto: Cursor
    ) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The new scalar rows as numpy arrays per ``(instrument, metric, param)``: O(new rows).

        Args:
            since: The client's cursor (``None``: from the start).
            upto: A cursor returned by :meth:`refresh`.

        Returns:
            ``{(instrument, metric, param): (step, wall_time, value)}`` in read order (not
            sorted, duplicates kept), for the rows with ``since < cursor <= upto``.

        """
        lo, hi = (-1 if since is None else int(since["scalars"])), int(upto["scalars"])
        with self._lock:
            pieces = [
                (key, piece)
                for key, bucket in self._buckets["scalars"].items()
                for piece in bucket.rows(lo, hi)
            ]
        grouped: dict[tuple[str, str, str], list[tuple[np.ndarray, ...]]] = {}
        for (inst, param), piece in pieces:
            cols = (piece.arrays["step"], piece.arrays["wall_time"], piece.arrays["value"])
            if len(piece.names) == 1:
                grouped.setdefault((inst, piece.names[0], param), []).append(cols)
                continue
            for code in np.unique(piece.metric):
                mask = piece.metric == code
                grouped.setdefault((inst, piece.names[code], param), []).append(
                    tuple(c[mask] for c in cols)
                )
        return {
            key: tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
            for key, parts in grouped.items()
        }

    def touched(self, since: Cursor, upto: Cursor) -> set[tuple[str, str, str]]:
        """``(table, instrument, param)`` of every bucket with rows after ``since``.

        Args:
            since: The client's cursor.
            upto: A cursor returned by :meth:`refresh`.

        Returns:
            The touched buckets.

        """
        out = set()
        with self._lock:
            for table in READ_TABLES:
                lo, hi = int(since[table]), int(upto[table])
                if hi <= lo:
                    continue
                for (inst, param), bucket in self._buckets[table].items():
                    if bucket.arrived(lo, hi):
                        out.add((table, inst, param))
        return out

    def params(self) -> list[str]:
        """Parameter names seen in the rows held (model order from ``meta.json`` when known)."""
        with self._lock:
            seen = {p for t in READ_TABLES for ps in self._params[t].values() for p in ps}
        seen -= {"all"}
        seen = {p for p in seen if not (p.startswith("group") and p[5:].isdigit())}
        model = [m.get("name") for m in self.meta.get("model", []) if isinstance(m, dict)]
        ordered = [m for m in model if m in seen]
        return ordered + sorted(seen - set(ordered))


class LogCache:
    """Shared, bounded, thread-safe cache of :class:`RunLog` per run under one root.

    Args:
        root: The log root (must exist).
        max_bytes: Approximate bound on the rows held; least recently used runs are dropped.
        min_refresh_s: Runs list their segments at most this often, however many clients ask.
        keep: The rows worth holding: ``(table, instrument, param)`` triples as
            :func:`app.layout.panel_reads` returns them (``param=None``: every param). Rows
            of other buckets are dropped when read (the dashboard passes what its panels and
            hints read); ``None`` holds every row.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is not a directory.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = Path(tmp.name)
        >>> with LogWriter(root / "sgd", {"tags": {"lr": 0.1}}) as writer:
        ...     writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> from app.data import LogCache
        >>> cache = LogCache(root, max_bytes=64 << 20)  # shared by every client of the server
        >>> [r.run_id for r in cache.list_runs()], cache.meta("sgd")["tags"]
        (['sgd'], {'lr': 0.1})
        >>> log, cursor = cache.get("sgd")
        >>> again, _ = cache.get("sgd")  # the same RunLog: rows are read once
        >>> again is log
        True
        >>> cache.discard("sgd")  # read anew on its next use
        >>> cache.get("sgd")[0] is log
        False
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        root: str | os.PathLike,
        max_bytes: int = 1 << 30,
        min_refresh_s: float = 0.25,
        keep: Collection[Read] | None = None,
    ) -> None:
        self.root = check_root(root)
        self.keep = None if keep is None else frozenset(keep)
        self.max_bytes = int(max_bytes)
        self.min_refresh_s = float(min_refresh_s)
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, RunLog] = OrderedDict()
        self._meta = _MetaCache()

    def list_runs(self) -> list[RunInfo]:
        """The runs under the root (see :func:`discover_runs`)."""
        return discover_runs(self.root, self._meta)

    def meta(self, run_id: str) -> dict[str, Any]:
        """A run's ``meta.json`` (``{}`` when missing).

        Raises:
            RunNotFound: If ``run_id`` is not a run under the root.

        """
        return self._meta.get(resolve_run(self.root, run_id))

    def get(self, run_id: object) -> tuple[RunLog, Cursor]:
        """The run's log, refreshed, and the cursor of the snapshot to use.

        Args:
            run_id: Untrusted run id.

        Returns:
            ``(run log, cursor)``.

        Raises:
            RunNotFound: If ``run_id`` is not a run under the root.
            RunGone: If the run was deleted (it is dropped from the cache).

        """
        try:
            path = resolve_run(self.root, run_id)
        except RunNotFound:
            with self._lock:
                known = self._runs.pop(run_id, None) if isinstance(run_id, str) else None
            if known is not None:
                raise RunGone(f"run {run_id!r} was deleted") from None
            raise
        assert isinstance(run_id, str)
        for _ in range(2):
            with self._lock:
                log = self._runs.get(run_id)
                if log is None or log.path != path:
                    log = self._runs[run_id] = RunLog(run_id, path, self.keep)
                self._runs.move_to_end(run_id)
            try:
                cursor = log.refresh(self.min_refresh_s)
            except RunGone:
                self.discard(run_id, log)
                try:
                    path = resolve_run(self.root, run_id)
                except RunNotFound:
                    raise RunGone(f"run {run_id!r} was deleted") from None
                continue  # replaced by a new run of the same name: start over
            self._evict(keep=run_id)
            return log, cursor
        raise RunGone(f"run {run_id!r} keeps changing")

    def discard(self, run_id: str, log: RunLog | None = None) -> None:
        """Forget a run (only ``log`` if given, so a newer instance survives)."""
        with self._lock:
            if run_id in self._runs and (log is None or self._runs[run_id] is log):
                del self._runs[run_id]

    @property
    def nbytes(self) -> int:
        """Approximate bytes held."""
        with self._lock:
            return sum(log.nbytes for log in self._runs.values())

    def _evict(self, keep: str) -> None:
        with self._lock:
            total = sum(log.nbytes for log in self._runs.values())
            for run_id in list(self._runs):
                if total <= self.max_bytes:
                    break
                if run_id != keep:
                    total -= self._runs.pop(run_id).nbytes
