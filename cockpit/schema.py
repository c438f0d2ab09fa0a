"""On-disk layout of a cockpit log: the one source of truth for writer and reader.

Layout
------
Runs are grouped under a *log root*; each run has its own directory::

    ROOT/<run_id>/
        meta.json                      run metadata, written atomically
        LOCK                           present while a writer has the run open
        END                            written atomically when the writer closes
        .COMPACT_LOCK                  present while a compaction rewrites the run
        scalars/part-000000.parquet    immutable segments, one row group each
        scalars/part-000001.parquet
        histograms/part-000000.parquet
        events/part-000000.parquet

``meta.json`` (JSON object; written to a temp file in the run directory,
fsynced, ``os.replace``-d into place, then the directory is fsynced):

- ``schema_version`` (int): :data:`SCHEMA_VERSION` of the writer.
- ``run_id`` (str): the run directory's name.
- ``start_time`` (float): unix seconds when the writer opened the run.
- ``versions`` (dict): ``python``, ``torch``, ``cockpit``, ``pyarrow``, ``pandas``.
- ``model`` (list): ``{name, shape, numel, requires_grad}`` per parameter
  (see :func:`describe_model`).
- ``optimizer`` (dict): ``{class, param_groups}``, the hyperparameters of each
  group without its parameters (see :func:`describe_optimizer`).
- ``instruments`` (list): ``{name, schedule, config}`` per instrument.
- ``tags`` (dict): user-supplied.
- any extra keys the caller passes.

The writer adds ``schema_version``, ``run_id``, ``start_time`` and ``versions``
itself and fills ``model``, ``optimizer``, ``instruments`` and ``tags`` with
empty defaults when the caller gives none.

``LOCK`` is JSON ``{pid, hostname, start_time}``, created with ``O_EXCL`` when a
writer opens the run and removed when it closes. ``END`` is JSON
``{end_time, steps_written, rows_dropped, status: "finished"}``, where
``steps_written`` counts the distinct steps of the scalar and histogram rows the
writer put on disk. A run's status is *finished* when ``END`` exists, *live*
when ``LOCK`` names a live process, and *crashed* otherwise.

Tables
------
``scalars`` (:data:`SCALARS_SCHEMA`), one row per value:

- ``step`` int64, ``wall_time`` float64 (unix seconds),
- ``instrument`` string, ``metric`` string,
- ``param`` string: a ``named_parameters()`` name, ``"all"`` for model-wide
  values, ``"group0"``, ``"group1"``, … for optimizer parameter groups,
- ``value`` float64 (NaN allowed).

For example ``(3, t, "loss", "loss", "all", 0.7)``,
``("grad_norm", "grad_norm", "0.weight")``, ``("alpha", "alpha", "all")``,
``("batch_size", "norm_test", "all")``, ``("hyperparameters", "lr", "group0")``
and user metrics as ``("user", "accuracy", "all")``.

``histograms`` (:data:`HISTOGRAMS_SCHEMA`), one row per histogram:

- ``step`` int64, ``wall_time`` float64,
- ``instrument`` string (e.g. ``"grad_hist_1d"``, ``"grad_hist_2d"``), ``param`` string,
- ``shape`` list<int64>: one entry for 1D, two for 2D,
- ``counts`` list<float64>: the counts flattened row-major,
- ``edges_0`` list<float64>: ``shape[0] + 1`` bin edges,
- ``edges_1`` list<float64>: ``shape[1] + 1`` bin edges; empty for 1D.

``events`` (:data:`EVENTS_SCHEMA`), one row per event:

- ``step`` int64 (``-1`` when not tied to a step), ``wall_time`` float64,
- ``level`` string: ``"info"``, ``"warning"`` or ``"error"``,
- ``instrument`` string (``""`` when none), ``message`` string.

Segments
--------
Each table directory holds immutable Parquet segments with one row group each.
A segment is written as ``.part-NNNNNN.parquet.tmp`` in the same directory,
flushed and fsynced, ``os.replace``-d to ``part-NNNNNN.parquet``, and then the
directory is fsynced, so a segment is either complete or absent. Numbers are
zero-padded to six digits (more digits past 999999) and increase by one per
segment and table, starting at 0. Names starting with ``.`` (temp files) are
never data, so ``pandas.read_parquet(run_dir / "scalars")`` reads a finished run.
Every file stores ``schema_version`` in its key-value metadata under
:data:`SCHEMA_VERSION_KEY`.

Compaction merges segments ``lo..hi`` into ``part-LO-HI.parquet`` (e.g.
``part-000000-000041.parquet``). The merged file keeps the rows in segment order
and records where each source segment's rows are in its key-value metadata
under :data:`SEGMENTS_KEY` (JSON ``[[lo, hi, n_rows], ...]``, one entry per
original segment). Once it is in place, it supersedes every file whose range
it contains, and readers ignore those; the small files are deleted afterwards.
Compaction runs from :func:`cockpit.logwriter.compact` and, every
``compact_every`` segments, in the writer's compaction thread; both hold
``.COMPACT_LOCK`` (JSON like ``LOCK``) while they work.
Rows within a segment are in the order they were added; a value for an earlier
step may arrive in a later segment.

A reader that finds a ``schema_version`` newer than :data:`SCHEMA_VERSION`
raises :class:`SchemaVersionError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa

__all__ = [
    "COMPACT_LOCK_FILE",
    "END_FILE",
    "EVENTS_COLUMNS",
    "EVENTS_SCHEMA",
    "EVENT_LEVELS",
    "HISTOGRAMS_COLUMNS",
    "HISTOGRAMS_SCHEMA",
    "LOCK_FILE",
    "META_FILE",
    "PARAM_ALL",
    "SCALARS_COLUMNS",
    "SCALARS_SCHEMA",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_KEY",
    "SEGMENTS_KEY",
    "TABLES",
    "SchemaVersionError",
    "Segment",
    "check_schema_version",
    "compacted_file_name",
    "describe_model",
    "describe_optimizer",
    "file_schema_version",
    "find_gaps",
    "group_param",
    "list_segments",
    "parse_segment_name",
    "segment_file_name",
    "segment_map",
    "temp_file_name",
    "visible_segments",
]

SCHEMA_VERSION = 1
"""Version of the layout and the table schemas written by this code."""

SCHEMA_VERSION_KEY = b"cockpit.schema_version"
"""Parquet key-value metadata key holding the schema version (ASCII integer)."""

SEGMENTS_KEY = b"cockpit.segments"
"""Parquet key-value metadata key of a compacted file: JSON ``[[lo, hi, n_rows], ...]``."""

META_FILE = "meta.json"
LOCK_FILE = "LOCK"
END_FILE = "END"
COMPACT_LOCK_FILE = ".COMPACT_LOCK"
"""Held (``O_EXCL``) by :func:`cockpit.logwriter.compact` while it rewrites a run."""

TABLES = ("scalars", "histograms", "events")
PARAM_ALL = "all"
EVENT_LEVELS = ("info", "warning", "error")

SCALARS_COLUMNS = ("step", "wall_time", "instrument", "metric", "param", "value")
HISTOGRAMS_COLUMNS = (
    "step",
    "wall_time",
    "instrument",
    "param",
    "shape",
    "counts",
    "edges_0",
    "edges_1",
)
EVENTS_COLUMNS = ("step", "wall_time", "level", "instrument", "message")

_FILE_METADATA = {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()}

SCALARS_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("wall_time", pa.float64(), nullable=False),
        pa.field("instrument", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("param", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
    ],
    metadata=_FILE_METADATA,
)
HISTOGRAMS_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("wall_time", pa.float64(), nullable=False),
        pa.field("instrument", pa.string(), nullable=False),
        pa.field("param", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("counts", pa.list_(pa.float64()), nullable=False),
        pa.field("edges_0", pa.list_(pa.float64()), nullable=False),
        pa.field("edges_1", pa.list_(pa.float64()), nullable=False),
    ],
    metadata=_FILE_METADATA,
)
EVENTS_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("wall_time", pa.float64(), nullable=False),
        pa.field("level", pa.string(), nullable=False),
        pa.field("instrument", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ],
    metadata=_FILE_METADATA,
)
SCHEMAS: dict[str, pa.Schema] = {
    "scalars": SCALARS_SCHEMA,
    "histograms": HISTOGRAMS_SCHEMA,
    "events": EVENTS_SCHEMA,
}


class SchemaVersionError(ValueError):
    """A log was written by a newer schema version than this reader knows.

    Example:
        >>> from cockpit.schema import SchemaVersionError, check_schema_version
        >>> try:
        ...     check_schema_version(99, "runs/a/scalars/part-000000.parquet")
        ... except SchemaVersionError as exc:
        ...     print(exc)
        runs/a/scalars/part-000000.parquet was written with cockpit log schema version 99, ...
    """


def check_schema_version(version: Any, path: str | os.PathLike) -> int:
    """Return ``version`` as an int, or raise if this code cannot read it.

    Args:
        version: The stored version (int, or bytes/str holding an int).
        path: The file the version came from, named in the error.

    Returns:
        The version as an int.

    Raises:
        SchemaVersionError: If the version is newer than :data:`SCHEMA_VERSION`
            or not an integer.

    Example:
        >>> from cockpit.schema import SCHEMA_VERSION, check_schema_version
        >>> check_schema_version(b"1", "meta.json") == 1 <= SCHEMA_VERSION
        True
        >>> check_schema_version("one", "meta.json")
        Traceback (most recent call last):
        ...
        cockpit.schema.SchemaVersionError: meta.json: schema_version 'one' is not an integer
    """
    if isinstance(version, bytes):
        version = version.decode("ascii", "replace")
    try:
        number = int(version)
    except (TypeError, ValueError):
        raise SchemaVersionError(f"{path}: schema_version {version!r} is not an integer") from None
    if number > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path} was written with cockpit log schema version {number}, but this "
            f"cockpit reads versions up to {SCHEMA_VERSION}; upgrade cockpit-live to read it"
        )
    return number


def file_schema_version(schema: pa.Schema, path: str | os.PathLike) -> int:
    """Check the schema version stored in a Parquet file's key-value metadata.

    Args:
        schema: The file's Arrow schema (``ParquetFile.schema_arrow``).
        path: The file, named in errors.

    Returns:
        The version; files without the key count as version 1.

    Example:
        >>> import pyarrow as pa
        >>> from cockpit.schema import SCALARS_SCHEMA, file_schema_version
        >>> file_schema_version(SCALARS_SCHEMA, "part-000000.parquet")  # what the writer stores
        1
        >>> file_schema_version(pa.schema([("step", pa.int64())]), "old.parquet")  # no key: 1
        1
    """
    metadata = schema.metadata or {}
    return check_schema_version(metadata.get(SCHEMA_VERSION_KEY, b"1"), path)


def group_param(index: int) -> str:
    """Return the ``param`` value of optimizer parameter group ``index`` (``"group0"``, …).

    Example:
        >>> from cockpit.schema import group_param
        >>> [group_param(i) for i in range(2)]  # e.g. the hyperparameters instrument's rows
        ['group0', 'group1']
    """
    return f"group{int(index)}"


# ---------------------------------------------------------------------------
# Segment files
# ---------------------------------------------------------------------------

_SEGMENT_RE = re.compile(r"^part-(\d{6,})(?:-(\d{6,}))?\.parquet$")


def segment_file_name(number: int) -> str:
    """Return the file name of segment ``number``, e.g. ``part-000042.parquet``.

    Example:
        >>> from cockpit.schema import parse_segment_name, segment_file_name
        >>> segment_file_name(42), parse_segment_name(segment_file_name(42))
        ('part-000042.parquet', (42, 42))
    """
    if number < 0:
        raise ValueError(f"segment number must be >= 0, got {number}")
    return f"part-{number:06d}.parquet"


def compacted_file_name(lo: int, hi: int) -> str:
    """Return the name of a file merging segments ``lo..hi``: ``part-000000-000041.parquet``.

    Example:
        >>> from cockpit.schema import compacted_file_name, parse_segment_name
        >>> compacted_file_name(0, 41), parse_segment_name(compacted_file_name(0, 41))
        ('part-000000-000041.parquet', (0, 41))
    """
    if not 0 <= lo <= hi:
        raise ValueError(f"invalid segment range {lo}..{hi}")
    return f"part-{lo:06d}-{hi:06d}.parquet"


def temp_file_name(final_name: str) -> str:
    """Return the temp name a file is written under before it is renamed to ``final_name``.

    Example:
        >>> from cockpit.schema import parse_segment_name, temp_file_name
        >>> temp_file_name("part-000042.parquet")
        '.part-000042.parquet.tmp'
        >>> parse_segment_name(temp_file_name("part-000042.parquet")) is None  # never data
        True
    """
    return f".{final_name}.tmp"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """Return the segment range ``(lo, hi)`` a file name covers, or None for other files.

    ``part-000042.parquet`` covers ``(42, 42)``; ``part-000000-000041.parquet``
    covers ``(0, 41)``. Temp files and other names return None.

    Example:
        >>> from cockpit.schema import parse_segment_name
        >>> parse_segment_name("part-000007.parquet")
        (7, 7)
        >>> parse_segment_name("part-000000-000041.parquet")  # a compacted file
        (0, 41)
        >>> parse_segment_name(".part-000008.parquet.tmp"), parse_segment_name("notes.txt")
        (None, None)
    """
    match = _SEGMENT_RE.match(name)
    if match is None:
        return None
    lo = int(match.group(1))
    hi = int(match.group(2)) if match.group(2) is not None else lo
    if hi < lo:
        return None
    return lo, hi


class Segment(NamedTuple):
    """One segment file on disk covering segment numbers ``lo..hi`` (inclusive).

    Example:
        >>> from pathlib import Path
        >>> from cockpit.schema import Segment
        >>> seg = Segment(0, 41, "part-000000-000041.parquet", Path("runs/a/scalars"))
        >>> seg.path.as_posix(), seg.compacted
        ('runs/a/scalars/part-000000-000041.parquet', True)
    """

    lo: int
    hi: int
    name: str
    directory: Path

    @property
    def path(self) -> Path:
        """The file's path."""
        return self.directory / self.name

    @property
    def compacted(self) -> bool:
        """Whether the file was produced by compaction (its name holds a range)."""
        return self.name.count("-") == 2


def list_segments(table_dir: str | os.PathLike, min_hi: int = 0) -> list[Segment]:
    """List the segment files in a table directory (one directory listing).

    Args:
        table_dir: e.g. ``run_dir / "scalars"``.
        min_hi: Leave out files whose range ends before this segment number
            (they cannot supersede the files that are kept).

    Returns:
        Every segment file with ``hi >= min_hi``, superseded ones included,
        sorted by ``(lo, -hi)``; an empty list when the directory does not exist.

    Example:
        The segments of a run written with two flushes:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriter
        >>> from cockpit.schema import list_segments
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with LogWriter(Path(tmp) / "run") as writer:
        ...         for step in range(2):
        ...             writer.add_scalar(step, "loss", "loss", "all", 1.0 / (step + 1))
        ...             writer.flush()
        ...     names = [s.name for s in list_segments(Path(tmp) / "run" / "scalars")]
        >>> names
        ['part-000000.parquet', 'part-000001.parquet']
    """
    table_dir = Path(table_dir)
    try:
        names = os.listdir(table_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    segments = []
    match = _SEGMENT_RE.match
    for name in names:
        found = match(name)
        if found is None:
            continue
        lo = int(found.group(1))
        hi = int(found.group(2)) if found.group(2) is not None else lo
        if hi >= lo and hi >= min_hi:
            segments.append(Segment(lo, hi, name, table_dir))
    segments.sort(key=lambda s: (s.lo, -s.hi))
    return segments


def visible_segments(segments: list[Segment]) -> list[Segment]:
    """Drop the segments whose range lies inside another segment's range.

    Args:
        segments: As returned by :func:`list_segments` (sorted by ``(lo, -hi)``).

    Returns:
        The files a reader should read, in segment order, with disjoint ranges.

    Example:
        A compacted file supersedes the segments inside its range:

        >>> from pathlib import Path
        >>> from cockpit.schema import Segment, compacted_file_name, segment_file_name
        >>> from cockpit.schema import visible_segments
        >>> d = Path("scalars")
        >>> listed = [
        ...     Segment(0, 1, compacted_file_name(0, 1), d),
        ...     Segment(0, 0, segment_file_name(0), d),  # deleted once compaction finishes
        ...     Segment(1, 1, segment_file_name(1), d),
        ...     Segment(2, 2, segment_file_name(2), d),
        ... ]
        >>> [s.name for s in visible_segments(listed)]
        ['part-000000-000001.parquet', 'part-000002.parquet']
    """
    visible: list[Segment] = []
    covered = -1
    for segment in segments:
        if segment.hi <= covered:
            continue  # inside the range of a file already kept
        visible.append(segment)
        covered = segment.hi
    return visible


def find_gaps(segments: list[Segment], start: int = 0) -> list[tuple[int, int]]:
    """Return the segment-number ranges from ``start`` to the last segment no file covers.

    A healthy table has none: numbers start at 0 and increase by one. A gap
    seen in a listing usually means the listing raced with a rename (the
    caller lists again); a gap that persists is a segment that was deleted.

    Args:
        segments: Visible segments in order (see :func:`visible_segments`).
        start: First segment number expected.

    Returns:
        Missing ``(lo, hi)`` ranges, inclusive.

    Example:
        >>> from pathlib import Path
        >>> from cockpit.schema import Segment, find_gaps
        >>> segs = [Segment(n, n, f"part-{n:06d}.parquet", Path(".")) for n in (0, 1, 4)]
        >>> find_gaps(segs)  # segments 2 and 3 are missing
        [(2, 3)]
        >>> find_gaps(segs, start=4)
        []
    """
    gaps = []
    expected = start
    for segment in segments:
        if segment.hi < expected:
            continue
        if segment.lo > expected:
            gaps.append((expected, segment.lo - 1))
        expected = segment.hi + 1
    return gaps


def segment_map(schema: pa.Schema, segment: Segment, num_rows: int) -> list[tuple[int, int, int]]:
    """Return ``[(lo, hi, n_rows), ...]`` describing which rows of a file came from which segment.

    Args:
        schema: The file's Arrow schema (holds :data:`SEGMENTS_KEY` if compacted).
        segment: The file.
        num_rows: Rows in the file; used when the file has no map.

    Returns:
        One entry per source segment, in row order; a single entry covering the
        whole file for plain segments.

    Example:
        >>> from pathlib import Path
        >>> from cockpit.schema import SCALARS_SCHEMA, SEGMENTS_KEY, Segment, segment_map
        >>> merged = Segment(0, 2, "part-000000-000002.parquet", Path("scalars"))
        >>> schema = SCALARS_SCHEMA.with_metadata({SEGMENTS_KEY: b"[[0, 0, 3], [1, 2, 5]]"})
        >>> segment_map(schema, merged, num_rows=8)  # rows 0-2 from segment 0, 3-7 from 1..2
        [(0, 0, 3), (1, 2, 5)]
        >>> segment_map(SCALARS_SCHEMA, Segment(3, 3, "part-000003.parquet", Path(".")), 4)
        [(3, 3, 4)]
    """
    raw = (schema.metadata or {}).get(SEGMENTS_KEY)
    if raw is None:
        return [(segment.lo, segment.hi, num_rows)]
    entries = [(int(lo), int(hi), int(n)) for lo, hi, n in json.loads(raw)]
    if sum(n for _, _, n in entries) != num_rows:
        raise ValueError(f"{segment.path}: segment map does not add up to {num_rows} rows")
    return entries


# ---------------------------------------------------------------------------
# Metadata helpers for callers (duck-typed: no torch import here)
# ---------------------------------------------------------------------------


def describe_model(model: Any) -> list[dict[str, Any]]:
    """Return the ``model`` entry of ``meta.json`` for a ``torch.nn.Module``.

    Args:
        model: Anything with ``named_parameters()``.

    Returns:
        ``[{name, shape, numel, requires_grad}, ...]`` in parameter order.

    Example:
        >>> import torch
        >>> from cockpit.schema import describe_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> _ = model[0].bias.requires_grad_(False)  # a frozen bias
        >>> for entry in describe_model(model):
        ...     print(entry)
        {'name': '0.weight', 'shape': [2, 3], 'numel': 6, 'requires_grad': True}
        {'name': '0.bias', 'shape': [2], 'numel': 2, 'requires_grad': False}
    """
    return [
        {
            "name": name,
            "shape": [int(d) for d in param.shape],
            "numel": int(param.numel()),
            "requires_grad": bool(param.requires_grad),
        }
        for name, param in model.named_parameters()
    ]


def describe_optimizer(optimizer: Any) -> dict[str, Any]:
    """Return the ``optimizer`` entry of ``meta.json`` for a ``torch.optim.Optimizer``.

    Args:
        optimizer: Anything with ``param_groups``.

    Returns:
        ``{"class": name, "param_groups": [hyperparameters without "params", ...]}``.

    Example:
        >>> import torch
        >>> from cockpit.schema import describe_optimizer
        >>> opt = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
        >>> info = describe_optimizer(opt)
        >>> info["class"], info["param_groups"][0]["lr"], info["param_groups"][0]["momentum"]
        ('SGD', 0.1, 0.9)
    """
    return {
        "class": type(optimizer).__name__,
        "param_groups": [
            {key: value for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups
        ],
    }
