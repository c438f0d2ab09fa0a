"""Crash-safe, append-only Parquet logging (writer side).

:class:`LogWriter` buffers rows in the training thread as plain Python tuples
and hands whole batches to one background thread through a bounded queue. The
thread builds Arrow tables and writes each batch as immutable segments (see
:mod:`cockpit.schema` for the layout), so training only waits on the disk when
the queue is full.

Batching and what a crash can lose: rows are handed off when a row for a new,
higher step arrives and the buffer already holds ``flush_every_steps`` distinct
steps, or ``flush_every_seconds`` have passed since the last hand-off. A batch
therefore holds whole steps, and segments hit the disk in order, so a crash
leaves a prefix of steps with no gaps or duplicates. It loses the rows still
buffered (at most one flush interval: ``flush_every_steps`` steps or
``flush_every_seconds``, plus the step in progress) and the batches the
background thread has not written yet: none while the disk keeps up; when it
lags, up to ``max_queue`` batches being written (the thread writes everything
queued at once) and ``max_queue`` waiting, after which ``add_*`` blocks. A
value that belongs to an earlier step (e.g. alpha for step t, known only after
step t + 1) goes into a later segment.

Typical use::

    with LogWriter(new_run_dir("runs"), metadata) as log:
        for step in range(steps):
            ...
            log.add_scalars(step, [("loss", "loss", "all", loss.item())])

Every ``compact_every`` segments of a table, the background thread merges the
new segments into one file (see :func:`compact`), so a long run is not left as
thousands of small files; readers never see a row missing or twice meanwhile.

Open writers are flushed and closed when they are garbage collected and at
interpreter exit (so a ``KeyboardInterrupt`` in the training loop loses no
rows); the exit hook holds writers through weak references.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import queue
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cockpit import schema
from cockpit.schema import (
    COMPACT_LOCK_FILE,
    END_FILE,
    EVENT_LEVELS,
    LOCK_FILE,
    META_FILE,
    SCHEMA_VERSION,
    SCHEMAS,
    SEGMENTS_KEY,
    TABLES,
    Segment,
)

__all__ = ["LockError", "LogWriteError", "LogWriter", "compact", "new_run_dir"]


class LockError(RuntimeError):
    """The run directory is already open in another writer (or compaction)."""


class LogWriteError(OSError):
    """Writing the log failed (raised in the caller thread by ``strict`` writers)."""


# ---------------------------------------------------------------------------
# Small file-system helpers
# ---------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync and rename."""
    tmp = path.with_name(schema.temp_file_name(path.name))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # torch tensors
        return obj.tolist()
    return str(obj)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, default=_json_default).encode()


def _write_parquet_atomic(path: Path, table: pa.Table, mtime: float | None = None) -> None:
    """Write ``table`` as one row group to ``path`` via a fsynced temp file and a rename."""
    tmp = path.with_name(schema.temp_file_name(path.name))
    try:
        pq.write_table(table, tmp, row_group_size=max(1, table.num_rows))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if mtime is not None:
            os.utime(tmp, (time.time(), mtime))
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _pid_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` runs on this host (and started no later than ``since``)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if since is None:
        return True
    started = _process_start_time(pid)
    # A process that started after the lock was written is a recycled pid.
    return started is None or started <= since + 2.0


def _process_start_time(pid: int) -> float | None:
    """Unix start time of ``pid`` from /proc, or None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    boot = int(line.split()[1])
                    break
            else:
                return None
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _read_lock(path: Path) -> dict[str, Any] | None:
    """Return a lock file's content, or None if it is missing or not (yet) valid JSON."""
    try:
        info = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _lock_is_stale(info: dict[str, Any]) -> bool:
    if info.get("hostname") != socket.gethostname():
        return False  # cannot check another host's processes: assume the owner lives
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return True
    since = info.get("start_time")
    return not _pid_alive(pid, float(since) if isinstance(since, (int, float)) else None)


def _acquire_lock(path: Path, what: str, wait: float = 0.0) -> None:
    """Create the lock file ``path`` with O_EXCL; take over a stale lock with a warning.

    Args:
        path: The lock file.
        what: What holds such a lock, for the error message.
        wait: Seconds to wait for a live holder to release it.

    Raises:
        LockError: If a live process holds the lock (after ``wait`` seconds).
    """
    give_up = time.monotonic() + wait
    content = _json_bytes(
        {"pid": os.getpid(), "hostname": socket.gethostname(), "start_time": time.time()}
    )
    invalid_since: float | None = None
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        info = _read_lock(path)
        if info is None:
            continue  # released meanwhile: try again
        if not info:
            # Empty or partial: the owner may be between creating and writing it.
            now = time.monotonic()
            invalid_since = invalid_since if invalid_since is not None else now
            if now - invalid_since < 1.0:
                time.sleep(0.01)
                continue
        elif not _lock_is_stale(info):
            if time.monotonic() < give_up:
                time.sleep(0.005)
                continue
            raise LockError(
                f"{path.parent} is already open in {what} of process {info.get('pid')} "
                f"on {info.get('hostname')} (lock file {path}); close it first, or remove "
                f"{path} if that process is gone"
            )
        warnings.warn(
            f"taking over stale lock {path} of process {info.get('pid')} on "
            f"{info.get('hostname')}, which is no longer running",
            RuntimeWarning,
            stacklevel=3,
        )
        _unlink_quietly(path)


# ---------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------


def new_run_dir(root: str | os.PathLike, name: str | None = None) -> Path:
    """Create a new, uniquely named run directory under ``root`` and return it.

    Args:
        root: The log root; created if missing.
        name: Run id to use; ``-1``, ``-2``, … is appended if it is taken.
            Defaults to the local time, e.g. ``20240131-142501``.

    Returns:
        The new (empty) run directory.

    Raises:
        NotADirectoryError: If ``root`` exists but is not a directory.
        ValueError: If ``name`` is not a plain directory name.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "log root is not a directory", str(root))
    base = name if name is not None else time.strftime("%Y%m%d-%H%M%S")
    if not base or base in (".", "..") or "/" in base or os.sep in base or base.startswith("."):
        raise ValueError(f"invalid run name {base!r}: use a plain directory name")
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(10_000):
        candidate = root / (base if attempt == 0 else f"{base}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free run directory name for {base!r} under {root}")


def _package_version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _versions() -> dict[str, str]:
    import cockpit  # the package is fully imported by the time a writer is built

    return {
        "python": platform.python_version(),
        "torch": _package_version("torch"),
        "cockpit": getattr(cockpit, "__version__", "unknown"),
        "pyarrow": pa.__version__,
        "pandas": _package_version("pandas"),
    }


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------


class _Batch:
    """Rows handed to the background thread: one list of row tuples per table."""

    __slots__ = ("scalars", "histograms", "events")

    def __init__(self) -> None:
        self.scalars: list[tuple] = []
        self.histograms: list[tuple] = []
        self.events: list[tuple] = []

    def __len__(self) -> int:
        return len(self.scalars) + len(self.histograms) + len(self.events)

    def extend(self, other: _Batch) -> None:
        self.scalars.extend(other.scalars)
        self.histograms.extend(other.histograms)
        self.events.extend(other.events)


class _Buffer:
    """The caller-thread buffer (kept apart from the writer so finalizers can reach it)."""

    __slots__ = ("batch", "steps", "max_step", "last_handoff")

    def __init__(self) -> None:
        self.batch = _Batch()
        self.steps: set[int] = set()
        self.max_step = -1
        self.last_handoff = time.monotonic()

    def take(self) -> _Batch:
        batch, self.batch = self.batch, _Batch()
        self.steps = set()
        self.last_handoff = time.monotonic()
        return batch


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class _Worker:
    """State shared by the writer, its finalizer and the background thread."""

    def __init__(
        self,
        run_dir: Path,
        next_segment: dict[str, int],
        max_queue: int,
        strict: bool,
        compact_every: int | None,
    ) -> None:
        self.run_dir = run_dir
        self.strict = strict
        self.next_segment = next_segment
        self.compact_every = compact_every
        # Only segments this writer wrote are compacted in the background.
        self.compact_from = dict(next_segment)
        self.compaction_warned = False
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.warned = False
        self.rows_dropped = 0
        self.steps_written: set[int] = set()
        self.thread = threading.Thread(
            target=self.run, name=f"cockpit-logwriter:{run_dir.name}", daemon=True
        )

    # -- background thread -------------------------------------------------

    def run(self) -> None:
        stop = False
        while not stop:
            items = [self.queue.get()]
            while True:  # coalesce whatever else is queued into the same segments
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            merged = _Batch()
            flushes = []
            for item in items:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Flush):
                    flushes.append(item)
                else:
                    merged.extend(item)
            try:
                if len(merged):
                    self.write(merged)
                    self.maybe_compact()
            except BaseException as exc:  # noqa: BLE001 - the thread must keep serving flushes
                self.fail(self.run_dir, exc, len(merged))
            finally:
                for item in flushes:
                    item.done.set()

    def write(self, batch: _Batch) -> None:
        for table_name in TABLES:
            rows = getattr(batch, table_name)
            if not rows:
                continue
            number = self.next_segment[table_name]
            path = self.run_dir / table_name / schema.segment_file_name(number)
            try:
                table = _build_table(table_name, rows)
                _write_parquet_atomic(path, table)
            except Exception as exc:  # noqa: BLE001 - any failure must not stop training
                self.fail(path, exc, len(rows))
                continue
            self.next_segment[table_name] = number + 1
            if table_name != "events":
                self.steps_written.update(row[0] for row in rows)

    def maybe_compact(self) -> None:
        """Merge every ``compact_every`` new segments of a table into one file."""
        if not self.compact_every:
            return
        for table_name in TABLES:
            first, end = self.compact_from[table_name], self.next_segment[table_name]
            if end - first < self.compact_every:
                continue
            lock_path = self.run_dir / COMPACT_LOCK_FILE
            try:
                _acquire_lock(lock_path, "a compaction")
            except LockError:
                continue  # someone else compacts right now: try again after the next segment
            except OSError:
                pass  # cannot even create the lock file: leave the segments alone
            else:
                try:
                    _compact_table(self.run_dir, table_name, first, end - 1)
                except Exception as exc:  # noqa: BLE001 - the segments stay as they are
                    if not self.compaction_warned:
                        self.compaction_warned = True
                        warnings.warn(
                            f"cockpit log: background compaction of {self.run_dir / table_name} "
                            f"failed ({exc!r}); its segments are left as they are",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                finally:
                    _unlink_quietly(lock_path)
            self.compact_from[table_name] = end

    def fail(self, path: Path, exc: BaseException, n_rows: int) -> None:
        self.rows_dropped += n_rows
        self.error = exc
        if not self.warned and not self.strict:
            self.warned = True
            warnings.warn(
                f"cockpit log: writing {path} failed ({exc!r}); dropping rows and continuing "
                f"(further failures are counted in rows_dropped, not reported)",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- caller side -------------------------------------------------------

    def put(self, item: Any) -> None:
        while True:
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise LogWriteError(
                        f"cockpit log writer thread for {self.run_dir} is not running"
                    ) from None


def _build_table(table_name: str, rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows, strict=True))
    if table_name == "scalars":
        step, wall_time, instrument, metric, param, value = columns
        arrays = [
            pa.array(step, pa.int64()),
            pa.array(wall_time, pa.float64()),
            pa.array(instrument, pa.string()),
            pa.array(metric, pa.string()),
            pa.array(param, pa.string()),
            pa.array(np.asarray(value, dtype=np.float64), pa.float64()),
        ]
    elif table_name == "events":
        step, wall_time, level, instrument, message = columns
        arrays = [
            pa.array(step, pa.int64()),
            pa.array(wall_time, pa.float64()),
            pa.array(level, pa.string()),
            pa.array(instrument, pa.string()),
            pa.array(message, pa.string()),
        ]
    else:
        step, wall_time, instrument, param, shape, counts, edges_0, edges_1 = columns
        arrays = [
            pa.array(step, pa.int64()),
            pa.array(wall_time, pa.float64()),
            pa.array(instrument, pa.string()),
            pa.array(param, pa.string()),
            pa.array(shape, pa.list_(pa.int64())),
            _list_array(counts),
            _list_array(edges_0),
            _list_array(edges_1),
        ]
    return pa.Table.from_arrays(arrays, schema=SCHEMAS[table_name])


def _list_array(pieces: Sequence[np.ndarray]) -> pa.Array:
    """Build a list<float64> array from 1D float64 numpy arrays without going through Python."""
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    offsets = np.zeros(len(pieces) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float64()))


def _close_worker(worker: _Worker, buffer: _Buffer, lock_path: Path, owner_pid: int) -> None:
    """Flush, stop the thread, write END and release LOCK (runs at most once per writer)."""
    if os.getpid() != owner_pid:
        return  # a forked child must not close its parent's run
    try:
        if len(buffer.batch):
            worker.put(buffer.take())
        worker.put(_STOP)
        worker.thread.join()
    finally:
        try:
            end = {
                "end_time": time.time(),
                "steps_written": len(worker.steps_written),
                "rows_dropped": worker.rows_dropped,
                "status": "finished",
            }
            _atomic_write_bytes(worker.run_dir / END_FILE, _json_bytes(end))
        except OSError as exc:
            worker.fail(worker.run_dir / END_FILE, exc, 0)
        finally:
            _unlink_quietly(lock_path)


def _to_float_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.array(values, dtype=np.float64)  # a copy: callers may reuse their buffers


class LogWriter:
    """Append-only, crash-safe Parquet log of one run.

    Args:
        run_dir: The run directory (``ROOT/<run_id>``). Created if missing; its
            parent, the log root, is created too unless it exists as a file.
        metadata: Run metadata for ``meta.json`` (``model``, ``optimizer``,
            ``instruments``, ``tags`` and any extra keys). The writer adds
            ``schema_version``, ``run_id``, ``start_time`` and ``versions``.
        flush_every_steps: Hand a batch to the background thread once it holds
            this many distinct steps and a row for a new step arrives.
        flush_every_seconds: ... or once this long has passed since the last
            hand-off (checked when rows are added).
        max_queue: Batches the background thread may fall behind before
            ``add_*`` blocks.
        strict: Re-raise background write failures in the caller thread at the
            next ``add_*``, ``flush`` or ``close`` (as :class:`LogWriteError`)
            instead of warning once and counting dropped rows.
        compact_every: The background thread merges every this many new
            segments of a table into one ``part-LO-HI.parquet`` (see
            :func:`compact`), so a long run stays quick to read; None: never.

    Raises:
        NotADirectoryError: If the log root or the run directory is a file.
        LockError: If another live writer has the run open.
        OSError: If the run directory cannot be created or written (read-only,
            disk full, ...); the message names the path.
        SchemaVersionError: If the run directory holds a newer-schema run.

    A writer is used from one thread (the training loop). Reopening an existing
    run directory continues it: segment numbers go on from the highest on disk,
    ``start_time`` and ``run_id`` are kept, and ``END`` is removed until close.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        metadata: dict[str, Any] | None = None,
        *,
        flush_every_steps: int = 20,
        flush_every_seconds: float = 5.0,
        max_queue: int = 64,
        strict: bool = False,
        compact_every: int | None = 100,
    ) -> None:
        if flush_every_steps < 1:
            raise ValueError(f"flush_every_steps must be >= 1, got {flush_every_steps}")
        if not flush_every_seconds > 0:
            raise ValueError(f"flush_every_seconds must be > 0, got {flush_every_seconds}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if compact_every is not None and compact_every < 2:
            raise ValueError(f"compact_every must be >= 2 or None, got {compact_every}")
        self._flush_every_steps = int(flush_every_steps)
        self._flush_every_seconds = float(flush_every_seconds)
        self._strict = bool(strict)
        self._closed = False

        run_dir = Path(run_dir).absolute()
        self._run_dir = run_dir
        _prepare_run_dir(run_dir)
        lock_path = run_dir / LOCK_FILE
        try:
            _acquire_lock(lock_path, "a LogWriter")
        except OSError as exc:
            raise _path_error(exc, lock_path, "cannot create the lock file") from exc
        try:
            next_segment = {}
            for table_name in TABLES:
                table_dir = run_dir / table_name
                try:
                    table_dir.mkdir(exist_ok=True)
                except OSError as exc:
                    raise _path_error(exc, table_dir, "cannot create the table directory") from exc
                segments = schema.list_segments(table_dir)
                next_segment[table_name] = max((s.hi for s in segments), default=-1) + 1
            self._write_meta(metadata)
            end_path = run_dir / END_FILE
            if end_path.exists():
                end_path.unlink()
        except BaseException:
            _unlink_quietly(lock_path)
            raise

        self._buffer = _Buffer()
        self._worker = _Worker(run_dir, next_segment, int(max_queue), self._strict, compact_every)
        self._worker.thread.start()
        # Called by close(), on garbage collection and at interpreter exit.
        self._finalizer = weakref.finalize(
            self, _close_worker, self._worker, self._buffer, lock_path, os.getpid()
        )

    def _write_meta(self, metadata: dict[str, Any] | None) -> None:
        meta_path = self._run_dir / META_FILE
        meta: dict[str, Any] = {
            "model": [],
            "optimizer": {},
            "instruments": [],
            "tags": {},
        }
        previous: dict[str, Any] = {}
        if meta_path.exists():
            try:
                previous = json.loads(meta_path.read_bytes())
            except ValueError as exc:
                raise ValueError(f"{meta_path} is not valid JSON: {exc}") from exc
            schema.check_schema_version(previous.get("schema_version", 1), meta_path)
            meta.update(previous)
        meta.update(metadata or {})
        meta["schema_version"] = SCHEMA_VERSION
        meta["run_id"] = self._run_dir.name
        meta["start_time"] = float(previous.get("start_time", time.time()))
        meta["versions"] = _versions()
        try:
            _atomic_write_bytes(meta_path, _json_bytes(meta))
        except OSError as exc:
            raise _path_error(exc, meta_path, "cannot write the run metadata") from exc

    # -- properties --------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return self._run_dir

    @property
    def rows_dropped(self) -> int:
        """Rows lost to write failures so far."""
        return self._worker.rows_dropped

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- adding rows -------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError(f"LogWriter for {self._run_dir} is closed")
        if self._strict and self._worker.error is not None:
            exc, self._worker.error = self._worker.error, None
            raise LogWriteError(f"cockpit log: writing to {self._run_dir} failed: {exc}") from exc

    def _before_step(self, step: int) -> None:
        """Hand off the buffer if ``step`` starts a new step and an interval is full."""
        buffer = self._buffer
        if step > buffer.max_step:
            if buffer.steps and (
                len(buffer.steps) >= self._flush_every_steps
                or time.monotonic() - buffer.last_handoff >= self._flush_every_seconds
            ):
                self._worker.put(buffer.take())
            buffer.max_step = step
        buffer.steps.add(step)

    def add_scalars(
        self,
        step: int,
        rows: Iterable[tuple[str, str, str, float]],
        wall_time: float | None = None,
    ) -> None:
        """Add scalar rows of one step.

        Args:
            step: Training step (>= 0).
            rows: ``(instrument, metric, param, value)`` tuples; values are
                converted with ``float`` (NaN allowed).
            wall_time: Unix seconds; defaults to now.
        """
        self._check()
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        wall_time = time.time() if wall_time is None else float(wall_time)
        str_ = str
        new_rows = [
            (
                step,
                wall_time,
                instrument if type(instrument) is str_ else str_(instrument),
                metric if type(metric) is str_ else str_(metric),
                param if type(param) is str_ else str_(param),
                float(value),
            )
            for instrument, metric, param, value in rows
        ]
        if not new_rows:
            return
        self._before_step(step)
        self._buffer.batch.scalars.extend(new_rows)

    def add_scalar(
        self,
        step: int,
        instrument: str,
        metric: str,
        param: str,
        value: float,
        wall_time: float | None = None,
    ) -> None:
        """Add one scalar row (see :meth:`add_scalars`)."""
        self.add_scalars(step, [(instrument, metric, param, value)], wall_time)

    def add_histogram(
        self,
        step: int,
        instrument: str,
        param: str,
        counts: Any,
        edges: Sequence[Any],
        wall_time: float | None = None,
    ) -> None:
        """Add one 1D or 2D histogram.

        Args:
            step: Training step (>= 0).
            instrument: e.g. ``"grad_hist_1d"``.
            param: Parameter name or ``"all"``.
            counts: Counts, shape ``[B0]`` or ``[B0, B1]`` (numpy array or tensor).
            edges: One edges array per dimension, of length ``B_i + 1``.
            wall_time: Unix seconds; defaults to now.

        Raises:
            ValueError: If the shapes of ``counts`` and ``edges`` do not match.
        """
        self._check()
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        counts_np = _to_float_array(counts)
        if counts_np.ndim not in (1, 2):
            raise ValueError(f"histogram counts must be 1D or 2D, got shape {counts_np.shape}")
        if len(edges) != counts_np.ndim:
            raise ValueError(
                f"{counts_np.ndim}D histogram needs {counts_np.ndim} edge arrays, got {len(edges)}"
            )
        edges_np = [_to_float_array(e).reshape(-1) for e in edges]
        for dim, e in enumerate(edges_np):
            if len(e) != counts_np.shape[dim] + 1:
                raise ValueError(
                    f"edges[{dim}] has {len(e)} entries; counts of shape {counts_np.shape} "
                    f"need {counts_np.shape[dim] + 1}"
                )
        wall_time = time.time() if wall_time is None else float(wall_time)
        row = (
            step,
            wall_time,
            _as_str(instrument),
            _as_str(param),
            list(counts_np.shape),
            counts_np.reshape(-1),
            edges_np[0],
            edges_np[1] if len(edges_np) == 2 else np.zeros(0, dtype=np.float64),
        )
        self._before_step(step)
        self._buffer.batch.histograms.append(row)

    def add_event(self, level: str, message: str, step: int = -1, instrument: str = "") -> None:
        """Add an event (a message for the run's event list).

        Events do not start steps: they are written with the batch of the
        scalar and histogram rows around them (at the latest on flush or close).

        Args:
            level: ``"info"``, ``"warning"`` or ``"error"``.
            message: Free text.
            step: The step it belongs to, or -1.
            instrument: The instrument that raised it, or ``""``.
        """
        self._check()
        if level not in EVENT_LEVELS:
            raise ValueError(f"event level must be one of {EVENT_LEVELS}, got {level!r}")
        row = (int(step), time.time(), level, _as_str(instrument), _as_str(message))
        self._buffer.batch.events.append(row)

    # -- flushing and closing ---------------------------------------------

    def flush(self) -> None:
        """Write everything added so far to disk; returns when it is there.

        Rows of the step in progress are written too, so rows added later for
        the same step go into a later segment.
        """
        self._check()
        if len(self._buffer.batch):
            self._worker.put(self._buffer.take())
        marker = _Flush()
        self._worker.put(marker)
        while not marker.done.wait(timeout=1.0):
            if not self._worker.thread.is_alive():
                raise LogWriteError(f"cockpit log writer thread for {self._run_dir} is not running")
        self._check()

    def close(self) -> None:
        """Flush, write ``END`` and release ``LOCK``. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        if self._strict and self._worker.error is not None:
            exc, self._worker.error = self._worker.error, None
            raise LogWriteError(f"cockpit log: writing to {self._run_dir} failed: {exc}") from exc

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"LogWriter({str(self._run_dir)!r}, {state})"


def _as_str(value: Any) -> str:
    return value if type(value) is str else str(value)


def _path_error(exc: OSError, path: Path, what: str) -> OSError:
    """Return an OSError of the same kind (same errno) that names ``path`` and says what failed."""
    if exc.errno:
        return OSError(exc.errno, f"{what}: {exc.strerror or exc}", str(path))
    return OSError(f"{what}: {path}: {exc}")


def _prepare_run_dir(run_dir: Path) -> None:
    root = run_dir.parent
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the log root is not a directory", str(root))
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the run directory is a file", str(run_dir))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _path_error(exc, run_dir, "cannot create the run directory") from exc
    if not os.access(run_dir, os.W_OK):
        raise PermissionError(errno.EACCES, "the run directory is not writable", str(run_dir))


# ---------------------------------------------------------------------------
# Compaction
# ---------------------------------------------------------------------------


def compact(
    run_dir: str | os.PathLike, table: str | None = None, *, wait: float = 30.0
) -> dict[str, int]:
    """Merge the segments of a run into one file per table (safe on live runs).

    For each table, the segments visible when compaction starts are merged in
    order into ``part-LO-HI.parquet``: written to a temp file, fsynced and
    renamed into place (from then on readers ignore the files inside the
    range), then the merged files are deleted. Segments the live writer adds
    meanwhile have higher numbers and are left alone. Each run of consecutive
    segment numbers is merged separately, so a missing segment is never papered
    over. Unreadable segments are skipped with a warning and kept as hidden
    ``.part-NNNNNN.parquet.corrupt`` files. Superseded files left behind by an
    interrupted compaction are deleted.

    Args:
        run_dir: The run directory.
        table: One of ``"scalars"``, ``"histograms"``, ``"events"``; all by default.
        wait: Seconds to wait while another compaction of the run (e.g. a
            writer's background compaction) is running.

    Returns:
        Per table, how many files were merged (0 when there was nothing to do).

    Raises:
        FileNotFoundError: If ``run_dir`` is not a run directory.
        LockError: If another compaction still holds the run after ``wait`` seconds.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such run directory", str(run_dir))
    tables = TABLES if table is None else (table,)
    for name in tables:
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; expected one of {TABLES}")
    lock_path = run_dir / COMPACT_LOCK_FILE
    _acquire_lock(lock_path, "a compaction", wait=wait)
    try:
        return {name: _compact_table(run_dir, name, cleanup=True) for name in tables}
    finally:
        _unlink_quietly(lock_path)


def _compact_table(
    run_dir: Path, name: str, lo: int = 0, hi: int | None = None, cleanup: bool = False
) -> int:
    """Merge the visible segments inside ``lo..hi`` (caller holds the compaction lock)."""
    from cockpit.logreader import _read_segment_file, _stable_listing

    table_dir = run_dir / name
    segments, all_segments = _stable_listing(table_dir)
    if cleanup:
        # Leftovers of an interrupted compaction: already superseded, never read.
        visible = set(segments)
        for seg in all_segments:
            if seg not in visible:
                _unlink_quietly(seg.path)
    chosen = [s for s in segments if s.lo >= lo and (hi is None or s.hi <= hi)]
    count = 0
    for run in _consecutive_runs(chosen):
        if len(run) > 1:
            count += _compact_run(name, table_dir, run, _read_segment_file)
    return count


def _consecutive_runs(segments: list[Segment]) -> list[list[Segment]]:
    runs: list[list[Segment]] = []
    for seg in segments:
        if runs and runs[-1][-1].hi + 1 == seg.lo:
            runs[-1].append(seg)
        else:
            runs.append([seg])
    return runs


def _compact_run(name: str, table_dir: Path, run: list[Segment], read_segment: Any) -> int:
    tables, entries, readable, corrupt = [], [], [], []
    mtime = 0.0
    for seg in run:
        try:
            table, seg_entries = read_segment(seg, name)
        except FileNotFoundError:
            raise  # someone else removed it: do not guess
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped
            warnings.warn(
                f"cockpit log: skipping unreadable segment {seg.path} while compacting ({exc})",
                RuntimeWarning,
                stacklevel=3,
            )
            corrupt.append(seg)
            continue
        mtime = max(mtime, seg.path.stat().st_mtime)
        tables.append(table)
        entries.extend(seg_entries)
        readable.append(seg)
    lo, hi = run[0].lo, run[-1].hi
    target = table_dir / schema.compacted_file_name(lo, hi)
    combined = pa.concat_tables(tables) if tables else SCHEMAS[name].empty_table()
    metadata = dict(SCHEMAS[name].metadata)
    metadata[SEGMENTS_KEY] = json.dumps([list(e) for e in entries]).encode()
    combined = combined.replace_schema_metadata(metadata)
    # Keep the newest input's mtime so "last update" stays the time data was logged.
    _write_parquet_atomic(target, combined, mtime=mtime or None)
    for seg in corrupt:
        try:
            os.replace(seg.path, seg.path.with_name(f".{seg.path.name}.corrupt"))
        except OSError:
            pass
    for seg in readable:
        _unlink_quietly(seg.path)
    _fsync_dir(table_dir)
    return len(run)
