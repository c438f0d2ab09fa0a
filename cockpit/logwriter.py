"""Crash-safe, append-only Parquet logging (writer side).

:class:`LogWriter` buffers rows in the training thread as plain Python tuples
and hands batches of them to a background thread, which builds Arrow tables and
writes each batch as immutable segments, in order (see :mod:`cockpit.schema`
for the layout). A second background thread compacts segments.

What a crash can lose. A *step window* is everything added from the first row
of a step up to the first row of the next, higher step; a value for an earlier
step (e.g. alpha for step t, known only after step t + 1) and events belong to
the window they are added in, and go into a later segment than their step.
With ``k = flush_every_steps`` and ``t = flush_every_seconds`` the writer keeps
this invariant:

* every row added before the newest ``k`` step windows (the current one
  counts) is on disk (fsynced, renamed into place), at every moment;
* every row added more than ``t`` seconds ago is on disk as well: checked each
  time a new step starts, and kept between steps by the background thread as
  long as writing a batch takes it less than ``t / 2``.

So a crash (SIGKILL, power loss) loses at most the rows of one flush interval:
rows added during the newest ``k`` steps, and only those of the last ``t``
seconds. To keep that without making training wait for the disk, the buffer is
handed off every *half* interval: when a new step starts and the buffer holds
``ceil(k / 2)`` step windows or rows ``t / 2`` old, and, without a new step,
when the background thread finds rows ``t / 2`` old. The disk then has the other
half interval to write them. Only when it is slower than that does a new step
wait in ``add_*`` until the rows the invariant needs are on disk; that is the
one place where training waits on the disk (with ``k = 1``: every step).

Batches hold whole step windows, and each table's segments hit the disk in
order, so a crash leaves a prefix of the steps with no gaps or duplicates. A
step is split across segments only by :meth:`LogWriter.flush`, or by the time
hand-off when its rows are added over more than ``t / 2``; a crash between the
two parts leaves the first part on disk.

Typical use::

    with LogWriter(new_run_dir("runs"), metadata) as log:
        for step in range(steps):
            ...
            log.add_scalars(step, [("loss", "loss", "all", loss.item())])

Every ``compact_every`` segments of a table, the compaction thread merges the
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
import socket
import threading
import time
import warnings
import weakref
from collections import deque
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
    """The run directory is already open in another writer (or compaction).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LockError, LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> writer = LogWriter(Path(tmp.name) / "run")
        >>> try:
        ...     LogWriter(Path(tmp.name) / "run")  # a second writer for the same run
        ... except LockError as exc:
        ...     print(str(exc).split(" (lock file")[0])
        /.../run is already open in a LogWriter of process ... on ...
        >>> writer.close()
        >>> tmp.cleanup()
    """


class LogWriteError(OSError):
    """Writing the log failed (raised in the caller thread by ``strict`` writers).

    Example:
        A ``strict`` writer raises in the training thread when the disk write fails:

        >>> import shutil, tempfile
        >>> from pathlib import Path
        >>> from cockpit.logwriter import LogWriteError, LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> run = Path(tmp.name) / "run"
        >>> writer = LogWriter(run, strict=True)
        >>> writer.add_scalar(0, "loss", "loss", "all", 1.0)
        >>> writer.flush()
        >>> shutil.rmtree(run / "scalars")
        >>> _ = (run / "scalars").write_text("not a directory")  # break the table directory
        >>> try:
        ...     writer.add_scalar(1, "loss", "loss", "all", 0.5)
        ...     writer.flush()
        ... except LogWriteError as exc:
        ...     print(str(exc).split(": [Errno")[0])
        cockpit log: writing to .../run failed
        >>> writer.close()
        >>> writer.rows_dropped  # a non-strict writer warns once and counts instead
        1
        >>> tmp.cleanup()
    """


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

    Example:
        >>> import tempfile
        >>> from cockpit.logwriter import new_run_dir
        >>> tmp = tempfile.TemporaryDirectory()
        >>> [new_run_dir(tmp.name, "sgd").name for _ in range(3)]
        ['sgd', 'sgd-1', 'sgd-2']
        >>> tmp.cleanup()
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


class _Window:
    """Rows added during one step window: from a step's first row to the next step's.

    ``index`` counts windows from 0 (-1 for rows added before the first step);
    ``start`` is the ``time.monotonic()`` of the window's first row.
    """

    __slots__ = ("index", "start", "scalars", "histograms", "events")

    def __init__(self, index: int, start: float) -> None:
        self.index = index
        self.start = start
        self.scalars: list[tuple] = []
        self.histograms: list[tuple] = []
        self.events: list[tuple] = []

    def __len__(self) -> int:
        return len(self.scalars) + len(self.histograms) + len(self.events)


class _Handoff:
    """Consecutive windows handed to the background thread (written as one segment per table)."""

    __slots__ = ("windows", "first_time", "n_rows")

    def __init__(self, windows: list[_Window]) -> None:
        self.windows = windows
        self.first_time = windows[0].start
        self.n_rows = sum(len(w) for w in windows)


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _Worker:
    """The caller's buffer, the durability bookkeeping and the background threads.

    Everything below ``cond`` is shared between the training thread and the
    writer thread and only touched while holding ``cond``. Rows are counted in
    the order they were added: the first ``rows_handed`` have left the buffer,
    the first ``rows_done`` are settled (on disk, or dropped after a failed
    write and counted in ``rows_dropped``), so a crash can only lose rows after
    them.
    """

    def __init__(
        self,
        run_dir: Path,
        next_segment: dict[str, int],
        *,
        max_steps: int,
        max_seconds: float,
        max_queue: int,
        strict: bool,
        compact_every: int | None,
    ) -> None:
        self.run_dir = run_dir
        self.strict = strict
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        # Hand off every half interval: the disk gets the other half to catch up.
        self.handoff_steps = (max_steps + 1) // 2
        self.handoff_seconds = max_seconds / 2
        self.max_queue = max_queue
        self.next_segment = next_segment
        self.compact_every = compact_every
        # Only segments this writer wrote are compacted in the background.
        self.compact_from = dict(next_segment)
        self.compaction_warned = False
        self.error: BaseException | None = None
        self.warned = False
        self.rows_dropped = 0
        self.steps_written: set[int] = set()

        self.cond = threading.Condition(threading.Lock())
        self.windows: list[_Window] = []  # the caller's buffer, oldest first
        self.window = -1  # index of the current window
        self.max_step = -1
        # rows_added at the start of each of the newest max_steps windows
        self.window_starts: deque[int] = deque(maxlen=max_steps)
        self.rows_added = 0
        self.rows_handed = 0
        self.rows_done = 0
        self.pending: deque[_Handoff | _Flush] = deque()  # not yet taken by the thread
        self.undone: deque[_Handoff] = deque()  # handed off, not yet written
        self.stopping = False
        # How often, and how long in all, a new step waited for the disk (for benchmarks).
        self.bound_waits = 0
        self.bound_wait_seconds = 0.0

        self.thread = threading.Thread(
            target=self.run, name=f"cockpit-logwriter:{run_dir.name}", daemon=True
        )
        self.compact_cond = threading.Condition(threading.Lock())
        self.compact_due = False
        self.compact_stop = False
        self.compactor = (
            threading.Thread(
                target=self.run_compactor, name=f"cockpit-compactor:{run_dir.name}", daemon=True
            )
            if compact_every
            else None
        )

    def start(self) -> None:
        self.thread.start()
        if self.compactor is not None:
            self.compactor.start()

    # -- caller side (training thread) ---------------------------------------

    def add(self, table: str, step: int | None, rows: list[tuple]) -> None:
        """Buffer ``rows`` of ``table``; a ``step`` above all before starts a new window."""
        with self.cond:
            if step is not None and step > self.max_step:
                self._start_window(step)
            elif not self.windows:
                self._open_window(time.monotonic())
            getattr(self.windows[-1], table).extend(rows)
            self.rows_added += len(rows)

    def _open_window(self, now: float) -> None:
        if not self.windows:
            self.cond.notify_all()  # the thread times the buffer's age from now on
        self.windows.append(_Window(self.window, now))

    def _start_window(self, step: int) -> None:
        """Begin the window of a new step: hand off, and wait if the bound requires it."""
        now = time.monotonic()
        self.max_step = step
        windows = self.windows
        if windows and (
            self.window - windows[0].index + 1 >= self.handoff_steps
            or now - windows[0].start >= self.handoff_seconds
        ):
            self._handoff()
        self.window += 1
        self.window_starts.append(self.rows_added)
        # The bound: every row added before the newest max_steps windows, and every
        # row added more than max_seconds ago, must be on disk before this one starts.
        need_rows = self.window_starts[0] if len(self.window_starts) == self.max_steps else 0
        oldest_allowed = now - self.max_seconds
        waited = False
        while True:
            if self.windows and (
                self.rows_handed < need_rows or self.windows[0].start < oldest_allowed
            ):
                self._handoff()  # unreachable with half-interval hand-offs; a safety net
            if self.rows_done >= need_rows and (
                not self.undone or self.undone[0].first_time >= oldest_allowed
            ):
                break
            waited = True
            self._wait()
        if waited:
            self.bound_waits += 1
            self.bound_wait_seconds += time.monotonic() - now
        self._open_window(now)

    def _handoff(self) -> None:
        """Move the whole buffer to the thread's queue (waits while ``max_queue`` batches wait)."""
        while len(self.pending) >= self.max_queue:
            self._wait()
        if not self.windows:
            return  # the thread took them meanwhile (time hand-off)
        item = _Handoff(self.windows)
        self.windows = []
        self._enqueue(item)

    def _enqueue(self, item: _Handoff) -> None:
        self.rows_handed += item.n_rows
        self.pending.append(item)
        self.undone.append(item)
        self.cond.notify_all()

    def _wait(self) -> None:
        if not self.thread.is_alive():
            raise LogWriteError(f"cockpit log writer thread for {self.run_dir} is not running")
        self.cond.wait(timeout=1.0)

    def flush(self) -> None:
        """Hand off everything and return once it is on disk."""
        marker = _Flush()
        with self.cond:
            if self.windows:
                self._handoff()
            self.pending.append(marker)
            self.cond.notify_all()
        while not marker.done.wait(timeout=1.0):
            if not self.thread.is_alive():
                raise LogWriteError(f"cockpit log writer thread for {self.run_dir} is not running")

    def stop(self) -> None:
        """Hand off everything, let the thread write it and end, then stop the compactor."""
        try:
            with self.cond:
                if self.windows:
                    self._handoff()
                self.stopping = True
                self.cond.notify_all()
            self.thread.join()
        finally:
            if self.compactor is not None:
                with self.compact_cond:
                    self.compact_stop = True
                    self.compact_cond.notify_all()
                self.compactor.join()

    # -- writer thread -------------------------------------------------------

    def _take_due(self, now: float) -> bool:
        """Hand off buffered rows older than half ``max_seconds`` (caller holds ``cond``).

        Whole windows are taken while the current one is younger than that, so
        a step is split across segments only when its rows were added over more
        than ``max_seconds / 2``.
        """
        windows = self.windows
        if not windows or now - windows[0].start < self.handoff_seconds:
            return False
        if len(windows) > 1 and now - windows[-1].start < self.handoff_seconds:
            taken, self.windows = windows[:-1], windows[-1:]
        else:
            taken, self.windows = windows, []
        self._enqueue(_Handoff(taken))
        return True

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.pending:
                    now = time.monotonic()
                    if self._take_due(now) or self.stopping:
                        break
                    timeout = (
                        self.windows[0].start + self.handoff_seconds - now if self.windows else None
                    )
                    self.cond.wait(timeout)
                items = list(self.pending)
                self.pending.clear()
                if not items:
                    return  # stopping, and everything is written
            batches = [item for item in items if isinstance(item, _Handoff)]
            n_rows = sum(b.n_rows for b in batches)
            try:
                if n_rows:
                    self.write(batches)
            except BaseException as exc:  # noqa: BLE001 - the thread must keep serving flushes
                self.fail(self.run_dir, exc, n_rows)
            finally:
                with self.cond:
                    self.rows_done += n_rows
                    for _ in batches:
                        self.undone.popleft()
                    self.cond.notify_all()
                for item in items:
                    if isinstance(item, _Flush):
                        item.done.set()
            if n_rows and self.compactor is not None:
                with self.compact_cond:
                    self.compact_due = True
                    self.compact_cond.notify_all()

    def write(self, batches: list[_Handoff]) -> None:
        for table_name in TABLES:
            rows = [row for b in batches for w in b.windows for row in getattr(w, table_name)]
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

    # -- compactor thread ----------------------------------------------------

    def run_compactor(self) -> None:
        """Merge segments apart from the writer thread, so writing never waits for it."""
        while True:
            with self.compact_cond:
                while not self.compact_due and not self.compact_stop:
                    self.compact_cond.wait()
                if not self.compact_due:
                    return
                self.compact_due = False
            while self.maybe_compact():
                pass

    def maybe_compact(self) -> bool:
        """Merge the next ``compact_every`` new segments of each table; True if it got on."""
        due = False
        for table_name in TABLES:
            first = self.compact_from[table_name]
            if self.next_segment[table_name] - first < self.compact_every:
                continue
            end = first + self.compact_every  # if the writer is further on: the next round
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
            due = True
        return due

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


def _close_worker(worker: _Worker, lock_path: Path, owner_pid: int) -> None:
    """Flush, stop the threads, write END and release LOCK (runs at most once per writer)."""
    if os.getpid() != owner_pid:
        return  # a forked child must not close its parent's run
    try:
        worker.stop()
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

    The loss bound (the invariant, stated in full in the module docstring):
    whenever a crash happens, the log on disk holds every row except at most
    those added during the newest ``flush_every_steps`` steps (the one in
    progress counts), and, as long as the disk writes a batch within
    ``flush_every_seconds / 2``, except at most those added in the last
    ``flush_every_seconds``. Rows are written from a background thread every
    half interval, so the training thread does not wait on the disk; it waits,
    when a new step starts, only if the disk has fallen so far behind that the
    bound would otherwise be broken.

    Args:
        run_dir: The run directory (``ROOT/<run_id>``). Created if missing; its
            parent, the log root, is created too unless it exists as a file.
        metadata: Run metadata for ``meta.json`` (``model``, ``optimizer``,
            ``instruments``, ``tags`` and any extra keys). The writer adds
            ``schema_version``, ``run_id``, ``start_time`` and ``versions``.
        flush_every_steps: ``k``: a crash loses rows of at most the newest ``k``
            steps. A batch is handed to the background thread when a new step
            starts and the buffer holds ``ceil(k / 2)`` steps; ``k = 1`` writes
            each step before the next one starts.
        flush_every_seconds: ``t``: a crash loses only rows added in the last
            ``t`` seconds. A batch is handed off once its oldest row is ``t / 2``
            old (when a new step starts, or by the background thread).
        max_queue: Batches waiting for the background thread before a hand-off
            waits (a memory cap; the loss bound normally waits first).
        strict: Re-raise background write failures in the caller thread at the
            next ``add_*``, ``flush`` or ``close`` (as :class:`LogWriteError`)
            instead of warning once and counting dropped rows.
        compact_every: The compaction thread merges every this many new
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
    A failed write drops its rows (counted in :attr:`rows_dropped`) and still
    counts as written for the bound, so a broken disk never blocks training.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from pathlib import Path
        >>> from cockpit.logreader import read_events, read_histograms, read_log, run_status
        >>> from cockpit.logwriter import LogWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> writer = LogWriter(Path(tmp.name) / "sgd", {"tags": {"lr": 0.1}}, flush_every_steps=10)
        >>> for step in range(3):
        ...     writer.add_scalars(step, [("loss", "loss", "all", 1.0 / (step + 1)),
        ...                               ("grad_norm", "grad_norm", "0.weight", 0.5)])
        ...     writer.add_scalar(step, "user", "accuracy", "all", 0.5 + 0.1 * step)
        >>> counts, edges = np.histogram([0.1, -0.2, 0.3], bins=4, range=(-1, 1))  # [B], [B + 1]
        >>> writer.add_histogram(2, "grad_hist_1d", "all", counts, [edges])
        >>> writer.add_event("info", "learning rate halved", step=2)
        >>> writer.flush()  # on disk now; readers see it while the run is live
        >>> run_status(writer.run_dir), len(read_log(writer.run_dir))
        ('live', 9)
        >>> writer.close()  # writes END and releases LOCK
        >>> writer.closed, writer.rows_dropped, run_status(writer.run_dir)
        (True, 0, 'finished')
        >>> read_histograms(writer.run_dir).counts[0].tolist()
        [0.0, 1.0, 2.0, 0.0]
        >>> read_events(writer.run_dir).message.tolist()
        ['learning rate halved']
        >>> tmp.cleanup()
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

        self._worker = _Worker(
            run_dir,
            next_segment,
            max_steps=self._flush_every_steps,
            max_seconds=self._flush_every_seconds,
            max_queue=int(max_queue),
            strict=self._strict,
            compact_every=compact_every,
        )
        self._worker.start()
        # Called by close(), on garbage collection and at interpreter exit.
        self._finalizer = weakref.finalize(
            self, _close_worker, self._worker, lock_path, os.getpid()
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
        self._worker.add("scalars", step, new_rows)

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
        self._worker.add("histograms", step, [row])

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
        self._worker.add("events", None, [row])

    # -- flushing and closing ---------------------------------------------

    def flush(self) -> None:
        """Write everything added so far to disk; returns when it is there.

        Rows of the step in progress are written too, so rows added later for
        the same step go into a later segment.
        """
        self._check()
        self._worker.flush()
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

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from cockpit.logreader import read_log
        >>> from cockpit.logwriter import LogWriter, compact
        >>> from cockpit.schema import list_segments
        >>> tmp = tempfile.TemporaryDirectory()
        >>> run = Path(tmp.name) / "run"
        >>> with LogWriter(run) as writer:
        ...     for step in range(3):
        ...         writer.add_scalar(step, "loss", "loss", "all", 1.0)
        ...         writer.flush()  # one segment per step
        >>> compact(run)
        {'scalars': 3, 'histograms': 0, 'events': 0}
        >>> [s.name for s in list_segments(run / "scalars")], read_log(run).step.tolist()
        (['part-000000-000002.parquet'], [0, 1, 2])
        >>> tmp.cleanup()
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
