import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cockpit.logreader import (
    LogTail,
    list_runs,
    read_events,
    read_histograms,
    read_log,
    read_meta,
    run_status,
)
from cockpit.logwriter import LogWriter, compact
from cockpit.schema import (
    SCALARS_COLUMNS,
    SCALARS_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    SchemaVersionError,
    segment_file_name,
)

KEY = ["step", "instrument", "metric", "param"]


def _write_run(run, steps, per_segment=1, rows=None):
    """Write ``steps`` steps, flushing a segment every ``per_segment`` steps."""
    rows = rows or [("loss", "loss", "all"), ("grad_norm", "grad_norm", "0.weight")]
    with LogWriter(run, flush_every_steps=10_000, flush_every_seconds=3600) as log:
        for step in range(steps):
            log.add_scalars(step, [(i, m, p, float(step)) for i, m, p in rows])
            if (step + 1) % per_segment == 0:
                log.flush()
    return run


def _segment_names(run, table="scalars"):
    return sorted(p.name for p in (Path(run) / table).iterdir())


def _sorted(frame):
    return frame.sort_values(KEY, kind="stable").reset_index(drop=True)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------
# read_log, read_histograms, read_events, read_meta
# ---------------------------------------------------------------------------


def test_read_log_filters_and_sorting(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run, flush_every_steps=2) as log:
        for step in range(6):
            log.add_scalars(
                step, [("loss", "loss", "all", step), ("grad_norm", "grad_norm", "all", 1)]
            )
            if step:
                log.add_scalar(step - 1, "alpha", "alpha", "all", -step)  # one step late
            log.flush()
    frame = read_log(run)
    assert frame["step"].is_monotonic_increasing
    assert frame.loc[frame.step == 2, "instrument"].tolist() == ["loss", "grad_norm", "alpha"]
    assert read_log(run, since_step=4)["step"].tolist() == [4, 4, 4, 5, 5]
    only_alpha = read_log(run, instruments="alpha")
    assert only_alpha["instrument"].unique().tolist() == ["alpha"]
    assert only_alpha["value"].tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0]
    both = read_log(run, since_step=3, instruments=["alpha", "loss"])
    assert set(both["instrument"]) == {"alpha", "loss"} and both["step"].min() == 3
    assert read_log(run, since_step=100).empty
    assert list(read_log(run, since_step=100).columns) == list(SCALARS_COLUMNS)


def test_same_step_rows_keep_their_order_across_many_segments(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run, compact_every=None) as log:
        for i in range(120):
            log.add_scalar(0, "user", "x", "all", float(i))
            log.flush()
    assert len(_segment_names(run)) == 120
    assert read_log(run)["value"].tolist() == [float(i) for i in range(120)]


def test_plain_pandas_reads_a_finished_run(tmp_path):
    run = _write_run(tmp_path / "run", 12, per_segment=5)
    (run / "scalars" / ".part-000009.parquet.tmp").write_bytes(b"half-written")
    plain = pd.read_parquet(run / "scalars")
    pd.testing.assert_frame_equal(_sorted(plain), _sorted(read_log(run)), check_dtype=False)
    compact(run)
    pd.testing.assert_frame_equal(
        _sorted(pd.read_parquet(run / "scalars")), _sorted(read_log(run)), check_dtype=False
    )


def test_read_histograms_filters(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run) as log:
        for step in range(4):
            for param in ("a", "b"):
                log.add_histogram(step, "grad_hist_1d", param, np.full(3, step), [np.arange(4.0)])
            log.add_histogram(
                step, "grad_hist_2d", "all", np.ones((2, 2)) * step, [np.arange(3.0)] * 2
            )
    hist = read_histograms(run, since_step=2, instrument="grad_hist_1d", param="b")
    assert hist["step"].tolist() == [2, 3]
    assert [c.tolist() for c in hist["counts"]] == [[2.0] * 3, [3.0] * 3]
    two_d = read_histograms(run, instrument="grad_hist_2d")
    assert all(c.shape == (2, 2) for c in two_d["counts"])
    assert read_histograms(run, param="nope").empty


def test_empty_tables(tmp_path):
    run = tmp_path / "run"
    LogWriter(run).close()
    assert read_log(run).empty
    assert list(read_histograms(run).columns)[-4:] == ["shape", "counts", "edges_0", "edges_1"]
    assert read_events(run).empty


def test_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_log(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        read_meta(tmp_path)


def test_newer_schema_version_in_meta(tmp_path):
    run = _write_run(tmp_path / "run", 2)
    meta = read_meta(run)
    meta["schema_version"] = SCHEMA_VERSION + 1
    (run / "meta.json").write_text(json.dumps(meta))
    for reader in (read_meta, read_log, read_histograms, read_events):
        with pytest.raises(SchemaVersionError, match=str(run / "meta.json")):
            reader(run)


def test_newer_schema_version_in_a_segment(tmp_path):
    run = _write_run(tmp_path / "run", 2)
    table = pq.read_table(run / "scalars" / "part-000000.parquet")
    newer = table.replace_schema_metadata({SCHEMA_VERSION_KEY: str(SCHEMA_VERSION + 1).encode()})
    path = run / "scalars" / segment_file_name(2)
    pq.write_table(newer, path)
    with pytest.raises(SchemaVersionError, match=str(path)):
        read_log(run)
    with pytest.raises(SchemaVersionError, match=str(path)):
        LogTail(run).read_new()


# ---------------------------------------------------------------------------
# Temp files, corrupt and missing segments
# ---------------------------------------------------------------------------


def test_temp_files_are_ignored_silently(tmp_path):
    run = _write_run(tmp_path / "run", 3)
    (run / "scalars" / ".part-000003.parquet.tmp").write_bytes(b"PAR1 half a file")
    (run / "scalars" / ".part-000000-000002.parquet.tmp").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_log(run)["step"].tolist() == [0, 0, 1, 1, 2, 2]
        assert len(LogTail(run).read_new()) == 6


def test_corrupt_segment_is_skipped_with_a_warning(tmp_path):
    run = _write_run(tmp_path / "run", 3)
    bad = run / "scalars" / "part-000001.parquet"
    bad.write_bytes(bad.read_bytes()[:-20])  # truncated: no valid footer
    with pytest.warns(RuntimeWarning, match=str(bad)):
        assert read_log(run)["step"].tolist() == [0, 0, 2, 2]
    with pytest.warns(RuntimeWarning, match=str(bad)):
        assert LogTail(run).read_new()["step"].tolist() == [0, 0, 2, 2]
    with pytest.warns(RuntimeWarning, match=str(bad)):
        compact(run)
    assert _segment_names(run) == [".part-000001.parquet.corrupt", "part-000000-000002.parquet"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_log(run)["step"].tolist() == [0, 0, 2, 2]


def test_missing_segment_is_reported(tmp_path):
    run = _write_run(tmp_path / "run", 4)
    (run / "scalars" / "part-000002.parquet").unlink()
    with pytest.warns(RuntimeWarning, match="segment\\(s\\) 2"):
        assert read_log(run)["step"].tolist() == [0, 0, 1, 1, 3, 3]
    with pytest.warns(RuntimeWarning, match="segment\\(s\\) 2"):
        compact(run)
    # The runs on both sides of the hole are merged separately; the hole stays visible.
    assert _segment_names(run) == ["part-000000-000001.parquet", "part-000003.parquet"]


# ---------------------------------------------------------------------------
# LogTail
# ---------------------------------------------------------------------------


def test_log_tail_returns_only_new_rows(tmp_path):
    run = tmp_path / "run"
    tail = LogTail(run)
    assert tail.read_new().empty  # the run does not exist yet
    with LogWriter(run) as log:
        log.add_scalars(0, [("loss", "loss", "all", 1.0)])
        log.flush()
        first = tail.read_new()
        assert first["step"].tolist() == [0] and tail.cursor == 0
        assert tail.read_new().empty
        assert list(tail.read_new().columns) == list(SCALARS_COLUMNS)
        log.add_scalars(1, [("loss", "loss", "all", 2.0)])
        log.add_scalar(0, "alpha", "alpha", "all", 0.5)
        log.flush()
        log.add_scalars(2, [("loss", "loss", "all", 3.0)])
        log.flush()
        second = tail.read_new()
    assert second[["step", "instrument"]].values.tolist() == [
        [0, "alpha"],
        [1, "loss"],
        [2, "loss"],
    ]
    assert tail.cursor == 2
    assert tail.read_new().empty


def test_log_tail_for_histograms_and_events(tmp_path):
    run = tmp_path / "run"
    hist_tail, event_tail = LogTail(run, "histograms"), LogTail(run, table="events")
    with LogWriter(run) as log:
        log.add_histogram(0, "grad_hist_1d", "all", np.ones(2), [np.arange(3.0)])
        log.add_event("info", "one")
        log.flush()
        assert hist_tail.read_new()["counts"].iloc[0].tolist() == [1.0, 1.0]
        assert event_tail.read_new()["message"].tolist() == ["one"]
        log.add_event("warning", "two")
        log.flush()
        assert hist_tail.read_new().empty
        assert event_tail.read_new()["message"].tolist() == ["two"]
    with pytest.raises(ValueError, match="unknown table"):
        LogTail(run, "nope")


def test_log_tail_across_compaction(tmp_path):
    run = tmp_path / "run"
    tail = LogTail(run)
    with LogWriter(run) as log:
        for step in range(3):
            log.add_scalars(step, [("loss", "loss", "all", step)])
            log.flush()
        assert tail.read_new()["step"].tolist() == [0, 1, 2]
        for step in range(3, 6):
            log.add_scalars(step, [("loss", "loss", "all", step)])
            log.flush()
        # The merged file covers segments on both sides of the tail's cursor.
        assert compact(run)["scalars"] == 6
        assert _segment_names(run) == ["part-000000-000005.parquet"]
        assert tail.read_new()["step"].tolist() == [3, 4, 5]
        assert tail.read_new().empty
        log.add_scalars(6, [("loss", "loss", "all", 6)])
        log.flush()
        assert _segment_names(run)[-1] == "part-000006.parquet"  # numbering goes on
        log.add_scalars(7, [("loss", "loss", "all", 7)])
        log.flush()
        assert tail.read_new()["step"].tolist() == [6, 7]
        # Compacting a compacted file again keeps the per-segment map exact.
        fresh = LogTail(run)
        assert fresh.read_new()["step"].tolist() == list(range(8))
        log.add_scalars(8, [("loss", "loss", "all", 8)])
        log.flush()
        compact(run)
        assert _segment_names(run) == ["part-000000-000008.parquet"]
        assert tail.read_new()["step"].tolist() == [8]
        assert fresh.read_new()["step"].tolist() == [8]
    late = LogTail(run)
    assert late.read_new()["step"].tolist() == list(range(9))


def test_log_tail_slices_compacted_histograms(tmp_path):
    run = tmp_path / "run"
    tail = LogTail(run, "histograms")
    frames = []
    with LogWriter(run, compact_every=None) as log:
        for step in range(6):  # a different number of bins every step
            log.add_histogram(step, "h", "all", np.full(step + 1, step), [np.arange(step + 2.0)])
            log.flush()
            if step == 2:
                frames.append(tail.read_new())
        compact(run)
        frames.append(tail.read_new())
    hist = pd.concat(frames, ignore_index=True)
    assert hist["step"].tolist() == list(range(6))
    for step, (shape, counts, edges) in enumerate(hist[["shape", "counts", "edges_0"]].values):
        assert shape == (step + 1,)
        assert counts.tolist() == [float(step)] * (step + 1)
        assert edges.tolist() == list(np.arange(step + 2.0))


# ---------------------------------------------------------------------------
# Compaction
# ---------------------------------------------------------------------------


def test_compaction_merges_and_is_idempotent(tmp_path):
    run = tmp_path / "run"
    with LogWriter(run) as log:
        for step in range(42):
            log.add_scalars(step, [("loss", "loss", "all", step)])
            log.add_histogram(step, "grad_hist_1d", "all", np.ones(2), [np.arange(3.0)])
            log.flush()
        log.add_event("info", "only one events segment")
    before = read_log(run)
    hist_before = read_histograms(run)
    assert compact(run) == {"scalars": 42, "histograms": 42, "events": 0}
    assert _segment_names(run) == ["part-000000-000041.parquet"]
    assert _segment_names(run, "histograms") == ["part-000000-000041.parquet"]
    assert _segment_names(run, "events") == ["part-000000.parquet"]
    merged = pq.ParquetFile(run / "scalars" / "part-000000-000041.parquet")
    assert merged.metadata.num_row_groups == 1
    assert merged.schema_arrow.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    merged.close()
    pd.testing.assert_frame_equal(read_log(run), before)
    after = read_histograms(run)
    assert [c.tolist() for c in after["counts"]] == [c.tolist() for c in hist_before["counts"]]
    assert compact(run) == {"scalars": 0, "histograms": 0, "events": 0}
    assert compact(run, "scalars") == {"scalars": 0}
    with pytest.raises(ValueError, match="unknown table"):
        compact(run, "nope")
    with pytest.raises(FileNotFoundError):
        compact(tmp_path / "missing")
    # A writer reopening the run numbers its segments after the merged range.
    with LogWriter(run) as log:
        log.add_scalars(42, [("loss", "loss", "all", 42)])
    assert _segment_names(run)[-1] == "part-000042.parquet"


def test_leftovers_of_an_interrupted_compaction(tmp_path):
    run = _write_run(tmp_path / "run", 5)
    saved = tmp_path / "saved"
    shutil.copytree(run / "scalars", saved)
    expected = read_log(run)
    compact(run)
    # As if compaction died after the rename, before deleting the small files.
    for path in saved.iterdir():
        shutil.copy2(path, run / "scalars" / path.name)
    assert len(_segment_names(run)) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pd.testing.assert_frame_equal(read_log(run), expected)
        pd.testing.assert_frame_equal(LogTail(run).read_new(), expected)
    compact(run)
    assert _segment_names(run) == ["part-000000-000004.parquet"]


def test_compaction_lock(tmp_path):
    run = _write_run(tmp_path / "run", 3)
    lock = run / ".COMPACT_LOCK"
    owner = {"pid": os.getpid(), "hostname": socket.gethostname(), "start_time": time.time()}
    lock.write_text(json.dumps(owner))
    with pytest.raises(RuntimeError, match="compaction"):
        compact(run, wait=0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="compaction"):
        compact(run, wait=0.2)
    assert time.monotonic() - start >= 0.2
    lock.write_text(json.dumps(dict(owner, pid=_dead_pid())))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        compact(run)
    assert not lock.exists()


def _check_snapshot(frame, rows_per_step):
    steps = np.sort(frame["step"].unique())
    assert steps.tolist() == list(range(len(steps))), "steps are not a prefix"
    assert not frame.duplicated(KEY).any(), "duplicate rows"
    assert (frame.groupby("step").size() == rows_per_step).all(), "partial step"
    return len(steps)


@pytest.mark.slow
def test_readers_during_repeated_compaction_of_a_live_run(tmp_path):
    run = tmp_path / "run"
    rows = [
        ("loss", "loss", "all"),
        ("grad_norm", "grad_norm", "a"),
        ("grad_norm", "grad_norm", "b"),
    ]
    steps = 3000
    # The writer compacts in the background too, racing with compact() below.
    writer = LogWriter(run, flush_every_steps=3, flush_every_seconds=3600, compact_every=10)
    writing_done = threading.Event()
    stop = threading.Event()
    failures = []
    reads = {"log": 0, "tail": 0}
    tail_frames = []

    progress = {"compactions": 0, "merged": 0}

    def wait_for_the_others():
        # Interleave for sure: let every other thread make progress between stretches of writing.
        before = (progress["compactions"], reads["log"], reads["tail"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not failures:
            now = (progress["compactions"], reads["log"], reads["tail"])
            if all(a > b for a, b in zip(now, before, strict=True)):
                return
            time.sleep(0.001)

    def write():
        try:
            for step in range(steps):
                writer.add_scalars(step, [(i, m, p, float(step)) for i, m, p in rows])
                if step % 100 == 99:
                    wait_for_the_others()
            writer.close()
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)
        finally:
            writing_done.set()

    def read_loop():
        seen = 0
        try:
            while not stop.is_set():
                k = _check_snapshot(read_log(run), len(rows))
                assert k >= seen, "steps disappeared"
                seen = k
                reads["log"] += 1
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    def tail_loop():
        tail = LogTail(run)
        try:
            while not stop.is_set():
                tail_frames.append(tail.read_new())
                reads["tail"] += 1
            tail_frames.append(tail.read_new())
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=f) for f in (write, read_loop, tail_loop)]
    for thread in threads:
        thread.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reader may ever see a hole
        while not writing_done.is_set():
            progress["merged"] += compact(run, "scalars")["scalars"]
            progress["compactions"] += 1
            time.sleep(0.002)
        compact(run)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    assert progress["compactions"] >= steps // 100 and reads["log"] >= steps // 100, (
        progress,
        reads,
    )
    assert progress["merged"] > 0, progress
    final = read_log(run)
    assert _check_snapshot(final, len(rows)) == steps
    tailed = pd.concat(tail_frames, ignore_index=True)
    pd.testing.assert_frame_equal(_sorted(tailed), _sorted(final))
    names = _segment_names(run)
    assert len(names) == 1 and names[0].startswith("part-000000-"), names


# ---------------------------------------------------------------------------
# list_runs and run_status
# ---------------------------------------------------------------------------


def test_list_runs(tmp_path):
    root = tmp_path / "runs"
    finished = root / "a-finished"
    with LogWriter(finished, {"tags": {"lr": 0.1}}) as log:
        for step in (0, 10, 20):  # logged every 10th step
            log.add_scalar(step, "loss", "loss", "all", 1.0)
    time.sleep(0.01)
    live = LogWriter(root / "b-live")
    live.add_scalar(0, "loss", "loss", "all", 1.0)
    live.flush()
    crashed = root / "c-crashed"
    with LogWriter(crashed) as log:
        log.add_scalar(0, "loss", "loss", "all", 1.0)
    (crashed / "END").unlink()
    owner = {"pid": _dead_pid(), "hostname": socket.gethostname(), "start_time": time.time()}
    (crashed / "LOCK").write_text(json.dumps(owner))
    newer = root / "d-newer"
    newer.mkdir()
    (newer / "meta.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    (root / "not-a-run").mkdir()
    (root / ".hidden").mkdir()
    (root / "file.txt").write_text("")

    with pytest.warns(RuntimeWarning, match=str(newer / "meta.json")):
        runs = list_runs(root)
    live.close()
    assert list(runs.columns) == [
        "run_id",
        "path",
        "status",
        "steps",
        "last_update",
        "start_time",
        "tags",
    ]
    by_id = runs.set_index("run_id")
    assert runs["run_id"].tolist() == ["a-finished", "b-live", "c-crashed"]
    assert by_id["status"].to_dict() == {
        "a-finished": "finished",
        "b-live": "live",
        "c-crashed": "crashed",
    }
    assert by_id.loc["a-finished", "steps"] == 21
    assert by_id.loc["a-finished", "tags"] == {"lr": 0.1}
    assert by_id.loc["a-finished", "path"] == finished
    newest = (finished / "scalars").iterdir().__next__().stat().st_mtime
    assert by_id.loc["a-finished", "last_update"] == pytest.approx(newest)
    assert by_id.loc["b-live", "start_time"] == pytest.approx(
        read_meta(root / "b-live")["start_time"]
    )
    assert run_status(root / "b-live") == "finished"
    (crashed / "LOCK").unlink()
    assert run_status(crashed) == "crashed"


def test_list_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_runs(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        list_runs(tmp_path / "file")
    empty = list_runs(tmp_path)
    assert empty.empty and "status" in empty.columns


def test_segment_written_by_hand_with_the_schema_is_read(tmp_path):
    # The schema module is the contract: a file written from it alone is readable.
    run = tmp_path / "run"
    (run / "scalars").mkdir(parents=True)
    table = pa.Table.from_pylist(
        [
            {
                "step": 0,
                "wall_time": 1.0,
                "instrument": "loss",
                "metric": "loss",
                "param": "all",
                "value": 2.0,
            }
        ],
        schema=SCALARS_SCHEMA,
    )
    pq.write_table(table, run / "scalars" / segment_file_name(0))
    assert read_log(run)["value"].tolist() == [2.0]
