import errno
import gc
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from cockpit.logreader import LogTail, read_events, read_histograms, read_log, read_meta
from cockpit.logwriter import LockError, LogWriteError, LogWriter, new_run_dir
from cockpit.schema import (
    HISTOGRAMS_COLUMNS,
    SCALARS_COLUMNS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    SchemaVersionError,
    describe_model,
    describe_optimizer,
)

REPO = Path(__file__).resolve().parents[2]


def _segments(run_dir, table="scalars"):
    return sorted(p.name for p in (Path(run_dir) / table).iterdir())


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


def test_scalars_round_trip(tmp_path):
    run = tmp_path / "root" / "run"
    expected = []
    with LogWriter(run, flush_every_steps=2) as log:
        for step in range(7):
            rows = [
                ("loss", "loss", "all", 1.0 / (step + 1)),
                ("grad_norm", "grad_norm", "0.weight", float(step)),
                ("hyperparameters", "lr", "group0", 0.1),
                ("user", "accuracy", "all", float("nan") if step == 3 else 0.5),
            ]
            log.add_scalars(step, rows, wall_time=1000.0 + step)
            expected += [(step, 1000.0 + step, *row) for row in rows]
        log.add_scalar(7, "batch_size", "norm_test", "all", np.float32(2.5), wall_time=2000.0)
        expected.append((7, 2000.0, "batch_size", "norm_test", "all", 2.5))

    frame = read_log(run)
    assert list(frame.columns) == list(SCALARS_COLUMNS)
    assert frame["step"].dtype == np.int64
    assert frame["value"].dtype == np.float64
    want = pd.DataFrame(expected, columns=list(SCALARS_COLUMNS))
    pd.testing.assert_frame_equal(
        frame.astype({c: object for c in ("instrument", "metric", "param")}),
        want.astype({c: object for c in ("instrument", "metric", "param")}),
    )
    assert math.isnan(frame.loc[(frame.step == 3) & (frame.metric == "accuracy"), "value"].item())


def test_histograms_round_trip_numpy_and_torch(tmp_path):
    counts_1d = np.array([1.0, 5.0, 2.0])
    edges_1d = np.array([-1.0, 0.0, 1.0, 2.0])
    counts_2d = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    edges_2d = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 0.5, 1.0, 1.5])]
    with LogWriter(tmp_path / "run") as log:
        log.add_histogram(0, "grad_hist_1d", "all", counts_1d, [edges_1d])
        counts_1d[:] = 0  # the writer copied it
        log.add_histogram(1, "grad_hist_2d", "0.weight", counts_2d, edges_2d)

    hist = read_histograms(tmp_path / "run")
    assert list(hist.columns) == list(HISTOGRAMS_COLUMNS)
    first, second = hist.iloc[0], hist.iloc[1]
    assert first["shape"] == (3,)
    np.testing.assert_array_equal(first.counts, [1.0, 5.0, 2.0])
    np.testing.assert_array_equal(first.edges_0, edges_1d)
    assert first.edges_1.size == 0
    assert second["shape"] == (2, 3)
    np.testing.assert_array_equal(second.counts, counts_2d.numpy())
    np.testing.assert_array_equal(second.edges_1, [0.0, 0.5, 1.0, 1.5])
    second.counts[0, 0] = 42.0  # readers hand out writable arrays

    table = pq.read_table(next((tmp_path / "run" / "histograms").glob("part-*.parquet")))
    assert table.column("shape").to_pylist() == [[3], [2, 3]]
    assert table.column("counts").to_pylist()[1] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_histogram_shape_checks(tmp_path):
    with LogWriter(tmp_path / "run") as log:
        with pytest.raises(ValueError, match="needs 2 edge arrays"):
            log.add_histogram(0, "h", "all", np.ones((2, 2)), [np.arange(3.0)])
        with pytest.raises(ValueError, match="edges\\[0\\] has 3 entries"):
            log.add_histogram(0, "h", "all", np.ones(3), [np.arange(3.0)])
        with pytest.raises(ValueError, match="1D or 2D"):
            log.add_histogram(0, "h", "all", np.ones((2, 2, 2)), [np.arange(3.0)] * 3)


def test_events_round_trip_and_level_check(tmp_path):
    with LogWriter(tmp_path / "run") as log:
        log.add_event("info", "started")
        log.add_event("warning", "loss is NaN", step=4, instrument="loss")
        with pytest.raises(ValueError, match="event level"):
            log.add_event("fatal", "nope")
    events = read_events(tmp_path / "run")
    assert events[["step", "level", "instrument", "message"]].values.tolist() == [
        [-1, "info", "", "started"],
        [4, "warning", "loss", "loss is NaN"],
    ]


def test_meta_json(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    metadata = {
        "model": describe_model(model),
        "optimizer": describe_optimizer(optimizer),
        "instruments": [{"name": "grad_norm", "schedule": "every(1)", "config": {}}],
        "tags": {"lr": 0.1},
        "dataset": "random",
        "schema_version": 999,  # the writer's own keys win
    }
    with LogWriter(tmp_path / "run", metadata) as log:
        meta = read_meta(log.run_dir)
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["run_id"] == "run"
    assert abs(meta["start_time"] - time.time()) < 60
    assert set(meta["versions"]) == {"python", "torch", "cockpit", "pyarrow", "pandas"}
    assert meta["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert meta["model"][0] == {
        "name": "0.weight",
        "shape": [2, 3],
        "numel": 6,
        "requires_grad": True,
    }
    assert meta["optimizer"]["class"] == "SGD"
    assert meta["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert "params" not in meta["optimizer"]["param_groups"][0]
    assert meta["tags"] == {"lr": 0.1} and meta["dataset"] == "random"
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []


def test_meta_defaults(tmp_path):
    with LogWriter(tmp_path / "run") as log:
        meta = read_meta(log.run_dir)
    assert meta["model"] == [] and meta["optimizer"] == {}
    assert meta["instruments"] == [] and meta["tags"] == {}


# ---------------------------------------------------------------------------
# Segments, batching, flushing
# ---------------------------------------------------------------------------


def test_segment_files_follow_the_schema(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run) as log:
        for step in range(5):
            log.add_scalars(step, [("loss", "loss", "all", 1.0)])
            log.flush()
    names = _segments(run)
    assert names == [f"part-{i:06d}.parquet" for i in range(5)]
    for name in names:
        parquet_file = pq.ParquetFile(run / "scalars" / name)
        assert parquet_file.metadata.num_row_groups == 1
        assert (
            parquet_file.schema_arrow.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
        )
        parquet_file.close()
    assert sorted(p.name for p in run.iterdir()) == [
        "END",
        "events",
        "histograms",
        "meta.json",
        "scalars",
    ]
    end = json.loads((run / "END").read_text())
    assert end["status"] == "finished" and end["steps_written"] == 5 and end["rows_dropped"] == 0
    assert end["end_time"] >= read_meta(run)["start_time"]


def test_batches_hold_whole_steps(tmp_path):
    run = tmp_path / "run"
    # Hand-offs every ceil(6 / 2) = 3 steps.
    with LogWriter(run, flush_every_steps=6, flush_every_seconds=3600) as log:
        for step in range(3):
            for param in ("a", "b"):  # rows of one step arrive in several calls
                log.add_scalar(step, "grad_norm", "grad_norm", param, 1.0)
        time.sleep(0.05)
        assert _segments(run) == []  # three steps buffered, none handed off yet
        log.add_scalar(3, "grad_norm", "grad_norm", "a", 1.0)  # a new step: hand off 0..2
        _wait_for(lambda: _segments(run) == ["part-000000.parquet"])
        log.add_scalar(3, "grad_norm", "grad_norm", "b", 1.0)
        log.add_scalar(2, "alpha", "alpha", "all", 0.5)  # a late value for step 2
    first = pq.read_table(run / "scalars" / "part-000000.parquet")
    second = pq.read_table(run / "scalars" / "part-000001.parquet")
    assert first.column("step").to_pylist() == [0, 0, 1, 1, 2, 2]
    assert second.column("step").to_pylist() == [3, 3, 2]
    frame = read_log(run)
    assert frame["step"].tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert frame.loc[frame.step == 2, "instrument"].tolist() == ["grad_norm", "grad_norm", "alpha"]


def test_time_based_hand_off(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run, flush_every_steps=1000, flush_every_seconds=0.4) as log:
        log.add_scalar(0, "loss", "loss", "all", 1.0)
        added_0 = time.monotonic()
        time.sleep(0.12)
        log.add_scalar(1, "loss", "loss", "all", 1.0)
        added_1 = time.monotonic()
        assert _segments(run) == []

        # No new step comes (a slow step, an evaluation): the background thread
        # hands rows off once they are t/2 old, so none stays in memory for t.
        # Step 0's window is complete (step 1 has started), so it goes alone;
        # step 1's follows when it is t/2 old itself.
        def on_disk():  # renamed into place; temp files do not count
            return [name for name in _segments(run) if not name.startswith(".")]

        _wait_for(lambda: len(on_disk()) >= 1)
        assert time.monotonic() - added_0 < 0.4
        _wait_for(lambda: len(on_disk()) == 2)
        assert time.monotonic() - added_1 < 0.4
        tables = [pq.read_table(run / "scalars" / name) for name in on_disk()]
        assert [t["step"].to_pylist() for t in tables] == [[0], [1]]


class _GatedDisk:
    """Patch segment writes to wait for ``open()``: a disk that is as slow as the test wants."""

    def __init__(self, monkeypatch):
        import cockpit.logwriter as logwriter

        self.gate = threading.Event()
        self.started = threading.Event()
        real = logwriter._write_parquet_atomic

        def gated(path, table, mtime=None):
            self.started.set()
            assert self.gate.wait(10.0), "gate never opened"
            real(path, table, mtime)

        monkeypatch.setattr(logwriter, "_write_parquet_atomic", gated)

    def open(self):
        self.gate.set()


def _in_thread(fn):
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_training_waits_only_when_the_step_bound_needs_it(tmp_path, monkeypatch):
    disk = _GatedDisk(monkeypatch)
    run = tmp_path / "run"
    # k = 4: hand-offs every 2 steps; step s may start once steps <= s - 4 are on disk.
    with LogWriter(run, flush_every_steps=4, flush_every_seconds=3600) as log:
        for step in range(4):  # step 2 hands off steps 0-1; the disk does not finish
            log.add_scalar(step, "loss", "loss", "all", float(step))
        assert disk.started.wait(5.0) and _segments(run) == []
        starting = _in_thread(lambda: log.add_scalar(4, "loss", "loss", "all", 4.0))
        starting.join(0.3)
        assert starting.is_alive(), "step 4 started while step 0 was only in memory"
        disk.open()
        starting.join(5.0)
        assert not starting.is_alive()
        assert read_log(run)["step"].tolist()[:2] == [0, 1]
    assert read_log(run)["step"].tolist() == [0, 1, 2, 3, 4]


def test_training_waits_only_when_the_time_bound_needs_it(tmp_path, monkeypatch):
    disk = _GatedDisk(monkeypatch)
    run = tmp_path / "run"
    with LogWriter(run, flush_every_steps=1000, flush_every_seconds=0.2) as log:
        log.add_scalar(0, "loss", "loss", "all", 0.0)
        assert disk.started.wait(5.0)  # handed off by the thread after 0.1 s
        log.add_scalar(1, "loss", "loss", "all", 1.0)  # step 0 is < 0.2 s old: no wait
        time.sleep(0.2)
        starting = _in_thread(lambda: log.add_scalar(2, "loss", "loss", "all", 2.0))
        starting.join(0.3)
        assert starting.is_alive(), "step 2 started while rows older than t were in memory"
        disk.open()
        starting.join(5.0)
        assert not starting.is_alive()
    assert read_log(run)["step"].tolist() == [0, 1, 2]


def test_flush_every_step_writes_each_step_before_the_next(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run, flush_every_steps=1, flush_every_seconds=3600) as log:
        for step in range(5):
            log.add_scalars(step, [("loss", "loss", "all", float(step))] * 2)
            assert read_log(run)["step"].tolist() == [s for s in range(step) for _ in (0, 1)]


def test_flush_blocks_until_everything_is_on_disk(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run, flush_every_steps=1000, flush_every_seconds=3600) as log:
        for step in range(10):
            log.add_scalar(step, "loss", "loss", "all", float(step))
            log.add_histogram(step, "grad_hist_1d", "all", np.ones(2), [np.arange(3.0)])
        log.add_event("info", "hi")
        log.flush()
        assert read_log(run)["step"].tolist() == list(range(10))
        assert len(read_histograms(run)) == 10
        assert len(read_events(run)) == 1


def test_background_compaction(tmp_path):
    run = tmp_path / "run"
    tail = LogTail(run)
    tailed = []
    with LogWriter(run, compact_every=3) as log:
        for step in range(10):
            log.add_scalars(step, [("loss", "loss", "all", float(step))])
            log.flush()
            tailed.append(tail.read_new())
    assert _segments(run) == [
        "part-000000-000002.parquet",
        "part-000003-000005.parquet",
        "part-000006-000008.parquet",
        "part-000009.parquet",
    ]
    frame = read_log(run)
    assert frame["step"].tolist() == list(range(10))
    pd.testing.assert_frame_equal(pd.concat(tailed, ignore_index=True), frame)
    # Segments written before this writer opened the run are left to compact().
    with LogWriter(run, compact_every=2) as log:
        log.add_scalars(10, [("loss", "loss", "all", 10.0)])
        log.flush()
        log.add_scalars(11, [("loss", "loss", "all", 11.0)])
    assert _segments(run)[-2:] == ["part-000009.parquet", "part-000010-000011.parquet"]


def test_close_is_idempotent_and_releases_the_lock(tmp_path):
    log = LogWriter(tmp_path / "run")
    assert (tmp_path / "run" / "LOCK").exists()
    lock = json.loads((tmp_path / "run" / "LOCK").read_text())
    assert lock["pid"] == os.getpid() and lock["hostname"] == socket.gethostname()
    log.add_scalar(0, "loss", "loss", "all", 1.0)
    log.close()
    log.close()
    assert log.closed
    assert not (tmp_path / "run" / "LOCK").exists()
    assert (tmp_path / "run" / "END").exists()
    with pytest.raises(RuntimeError, match="closed"):
        log.add_scalar(1, "loss", "loss", "all", 1.0)
    assert len(read_log(tmp_path / "run")) == 1


def test_garbage_collection_closes_the_writer(tmp_path):
    log = LogWriter(tmp_path / "run", flush_every_steps=100)
    log.add_scalar(0, "loss", "loss", "all", 1.0)
    del log
    gc.collect()
    assert (tmp_path / "run" / "END").exists()
    assert not (tmp_path / "run" / "LOCK").exists()
    assert len(read_log(tmp_path / "run")) == 1


def test_keyboard_interrupt_loses_no_rows(tmp_path):
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        from cockpit.logwriter import LogWriter
        log = LogWriter({str(run)!r}, flush_every_steps=1000, flush_every_seconds=3600)
        for step in range(50):
            log.add_scalar(step, "loss", "loss", "all", float(step))
        raise KeyboardInterrupt
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "KeyboardInterrupt" in result.stderr
    assert read_log(run)["step"].tolist() == list(range(50))
    assert json.loads((run / "END").read_text())["steps_written"] == 50
    assert not (run / "LOCK").exists()


def test_reopening_a_run_continues_it(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run, {"tags": {"a": 1}}) as log:
        log.add_scalar(0, "loss", "loss", "all", 1.0)
    start = read_meta(run)["start_time"]
    log = LogWriter(run, {"tags": {"a": 2}})
    assert not (run / "END").exists()
    log.add_scalar(1, "loss", "loss", "all", 2.0)
    log.close()
    assert _segments(run) == ["part-000000.parquet", "part-000001.parquet"]
    assert read_meta(run)["start_time"] == start and read_meta(run)["tags"] == {"a": 2}
    assert read_log(run)["value"].tolist() == [1.0, 2.0]


# ---------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------


def test_second_writer_on_the_same_run_fails(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run):
        with pytest.raises(LockError) as info:
            LogWriter(run)
        message = str(info.value)
        assert str(run) in message and str(os.getpid()) in message
    with LogWriter(run):  # free again after close
        pass


def test_second_writer_in_another_process_fails(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run):
        script = f"from cockpit.logwriter import LogWriter; LogWriter({str(run)!r})"
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
        )
    assert result.returncode != 0
    assert "LockError" in result.stderr and f"process {os.getpid()}" in result.stderr


@pytest.mark.parametrize("kind", ["dead", "recycled", "garbage"])
def test_stale_lock_is_taken_over(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    owner = {
        "dead": {"pid": _dead_pid(), "hostname": socket.gethostname(), "start_time": time.time()},
        # our own pid, but the lock predates this process: the pid was recycled
        "recycled": {"pid": os.getpid(), "hostname": socket.gethostname(), "start_time": 1000.0},
        "garbage": None,
    }[kind]
    (run / "LOCK").write_text("{not json" if owner is None else json.dumps(owner))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        log = LogWriter(run)
    assert json.loads((run / "LOCK").read_text())["pid"] == os.getpid()
    log.close()


def test_lock_of_another_host_is_respected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    owner = {"pid": 1, "hostname": "some-other-host", "start_time": time.time()}
    (run / "LOCK").write_text(json.dumps(owner))
    with pytest.raises(LockError, match="some-other-host"):
        LogWriter(run)
    assert json.loads((run / "LOCK").read_text()) == owner


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_log_root_that_is_a_file(tmp_path):
    (tmp_path / "root").write_text("")
    with pytest.raises(NotADirectoryError) as info:
        LogWriter(tmp_path / "root" / "run")
    assert str(tmp_path / "root") in str(info.value)


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(NotADirectoryError, match="run directory is a file"):
        LogWriter(tmp_path / "run")


def test_unwritable_location(tmp_path):
    # Running as root, chmod does not stop writes; sysfs refuses new directories for real.
    if not Path("/sys/kernel").is_dir():
        pytest.skip("needs sysfs")
    with pytest.raises(OSError) as info:
        LogWriter("/sys/kernel/cockpit-test-run")
    assert "/sys/kernel/cockpit-test-run" in str(info.value)
    assert info.value.errno in (errno.EPERM, errno.EACCES, errno.EROFS, errno.ENOENT)


def test_disk_full_at_construction(tmp_path):
    # The temp file of meta.json is a symlink to /dev/full: writing it fails with ENOSPC.
    run = tmp_path / "run"
    run.mkdir()
    (run / ".meta.json.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError) as info:
        LogWriter(run)
    assert info.value.errno == errno.ENOSPC
    assert str(run / "meta.json") in str(info.value)
    assert not (run / "LOCK").exists()


def _fill_disk_for(run, table="scalars", number=0):
    (run / table).mkdir(parents=True, exist_ok=True)
    tmp = run / table / f".part-{number:06d}.parquet.tmp"
    tmp.symlink_to("/dev/full")


def test_write_failure_warns_once_and_training_continues(tmp_path):
    run = tmp_path / "run"
    _fill_disk_for(run)
    with pytest.warns(RuntimeWarning) as record:
        log = LogWriter(run, flush_every_steps=1)
        log.add_scalars(0, [("loss", "loss", "all", 1.0)] * 3)
        log.flush()
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "part-000000.parquet" in messages[0] and "No space left" in messages[0]
    assert log.rows_dropped == 3
    _fill_disk_for(run)  # fails again: counted, not reported again
    log.add_scalars(1, [("loss", "loss", "all", 1.0)] * 2)
    log.flush()
    assert log.rows_dropped == 5
    log.add_scalars(2, [("loss", "loss", "all", 1.0)])  # the disk has room again
    log.close()
    assert read_log(run)["step"].tolist() == [2]
    assert json.loads((run / "END").read_text())["rows_dropped"] == 5


def test_strict_mode_raises_in_the_caller(tmp_path):
    run = tmp_path / "run"
    _fill_disk_for(run)
    log = LogWriter(run, strict=True)
    log.add_scalars(0, [("loss", "loss", "all", 1.0)])
    with pytest.raises(LogWriteError) as info:
        log.flush()
    assert str(run) in str(info.value)
    assert info.value.__cause__.errno == errno.ENOSPC
    log.add_scalars(1, [("loss", "loss", "all", 1.0)])  # reported once, then usable
    log.close()
    assert read_log(run)["step"].tolist() == [1]


def test_strict_mode_raises_at_the_next_add(tmp_path):
    run = tmp_path / "run"
    _fill_disk_for(run)
    log = LogWriter(run, strict=True, flush_every_steps=1)
    log.add_scalars(0, [("loss", "loss", "all", 1.0)])
    log.add_scalars(1, [("loss", "loss", "all", 1.0)])  # hands step 0 off
    _wait_for(lambda: log.rows_dropped == 1)
    with pytest.raises(LogWriteError):
        log.add_scalars(2, [("loss", "loss", "all", 1.0)])
    log.close()


def test_newer_run_in_the_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(SchemaVersionError, match=str(run / "meta.json")):
        LogWriter(run)
    assert not (run / "LOCK").exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"flush_every_steps": 0}, {"flush_every_seconds": 0}, {"max_queue": 0}, {"compact_every": 1}],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        LogWriter(tmp_path / "run", **kwargs)


def test_negative_step(tmp_path):
    with LogWriter(tmp_path / "run") as log:
        with pytest.raises(ValueError, match="step"):
            log.add_scalar(-1, "loss", "loss", "all", 1.0)


# ---------------------------------------------------------------------------
# new_run_dir
# ---------------------------------------------------------------------------


def test_new_run_dir_is_unique(tmp_path):
    root = tmp_path / "runs"
    first = new_run_dir(root, "exp")
    second = new_run_dir(root, "exp")
    third = new_run_dir(root, "exp")
    assert [first.name, second.name, third.name] == ["exp", "exp-1", "exp-2"]
    assert all(p.is_dir() for p in (first, second, third))
    stamped = {new_run_dir(root) for _ in range(3)}
    assert len(stamped) == 3
    with LogWriter(first) as log:
        assert log.run_dir == first.absolute()


def test_new_run_dir_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file"):
        new_run_dir(tmp_path / "file")
    for bad in ("", "a/b", ".hidden", ".."):
        with pytest.raises(ValueError):
            new_run_dir(tmp_path, bad)
