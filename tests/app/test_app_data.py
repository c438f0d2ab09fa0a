"""app.data (run discovery, path safety, the shared incremental cache) and the update logic
behind the dashboard's callbacks, on logs written by the real LogWriter."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest

from app import create_app
from app.callbacks import MAX_POINTS
from app.data import (
    LogCache,
    RunGone,
    RunNotFound,
    check_root,
    discover_runs,
    resolve_run,
)
from app.layout import panel_catalog
from cockpit.logreader import read_histograms, read_log
from cockpit.logwriter import LogWriter, compact
from instruments.base import Instrument, PanelSpec
from tests.app.conftest import PARAMS, flask_session, metadata, write_steps


def writer(run_dir, **kw):
    return LogWriter(run_dir, metadata(), flush_every_steps=1, flush_every_seconds=1e6, **kw)


def steps_of(df, instrument="loss", param="all"):
    sel = df[(df["instrument"] == instrument) & (df["param"] == param)]
    return sorted(int(s) for s in sel["step"])


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


# --------------------------------------------------------------------------------------------
# Roots and path safety
# --------------------------------------------------------------------------------------------
def test_nonexistent_root_fails_clearly_at_create_app(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_app(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LogCache(missing)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        create_app(afile)
    with pytest.raises(ValueError, match="refresh_s"):
        create_app(tmp_path, refresh_s=0)


def test_empty_root_lists_nothing(root):
    assert discover_runs(root) == []
    assert LogCache(root).list_runs() == []
    assert check_root(root) == root.resolve()


def test_resolve_run_accepts_only_runs_directly_under_the_root(root, tmp_path):
    with writer(root / "good") as w:
        write_steps(w, range(3))
    outside = tmp_path / "outside"
    with writer(outside) as w:  # a real run, but not under the root
        write_steps(w, range(3))
    (root / "nested").mkdir()
    with writer(root / "nested" / "inner") as w:
        write_steps(w, range(2))
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(root / "good", target_is_directory=True)
    (root / "not-a-run").mkdir()
    (root / ".hidden").mkdir()
    (root / ".hidden" / "meta.json").write_text("{}")

    assert resolve_run(root, "good") == (root / "good").resolve()
    assert resolve_run(root, "alias") == (root / "good").resolve()  # still under the root
    refused = [
        "..",
        ".",
        "",
        "../outside",
        str(outside),
        "/etc",
        "nested/inner",
        "escape",
        "not-a-run",
        "missing",
        ".hidden",
        "good/../good",
        "good\x00",
        "..\\outside",
        None,
        3,
        ["good"],
        {"run": "good"},
        "x" * 300,
    ]
    for bad in refused:
        with pytest.raises(RunNotFound):
            resolve_run(root, bad)
    cache = LogCache(root)
    for bad in refused:
        with pytest.raises(RunNotFound):
            cache.get(bad)
    assert {r.run_id for r in discover_runs(root)} == {"good", "alias"}


def test_discover_runs_orders_by_start_time_and_reports_status(root):
    for name in ("b-first", "a-second"):
        with writer(root / name) as w:
            write_steps(w, range(2))
        time.sleep(0.01)
    live = writer(root / "c-live")
    write_steps(live, range(2))
    try:
        runs = discover_runs(root)
        assert [r.run_id for r in runs] == ["b-first", "a-second", "c-live"]
        assert [r.status for r in runs] == ["finished", "finished", "live"]
        assert all(np.isfinite(r.start_time) for r in runs)
    finally:
        live.close()


# --------------------------------------------------------------------------------------------
# Cursor semantics
# --------------------------------------------------------------------------------------------
def test_cursor_gives_exactly_the_new_rows_and_snapshots_are_consistent(root):
    run = root / "r"
    cache = LogCache(root, min_refresh_s=0.0)
    w = writer(run)
    try:
        write_steps(w, range(0, 10))
        w.flush()
        log, c1 = cache.get("r")
        assert steps_of(log.frame("scalars", None, c1)) == list(range(10))
        first = log.new_rows("scalars", None, c1)
        assert steps_of(first) == list(range(10))

        write_steps(w, range(10, 25))
        w.flush()
        snapshot = log.frame("scalars", [("loss", "all")], c1)  # before refreshing
        log2, c2 = cache.get("r")
        assert log2 is log and c2["scalars"] > c1["scalars"] and c2["epoch"] == c1["epoch"]
        # The old snapshot cursor still selects the old rows only.
        assert steps_of(log.frame("scalars", None, c1)) == list(range(10))
        assert steps_of(snapshot) == list(range(10))
        new = log.new_rows("scalars", c1, c2)
        assert steps_of(new) == list(range(10, 25))
        assert steps_of(new, "grad_norm", PARAMS[1]) == list(range(10, 25))
        assert log.new_rows("scalars", c2, c2).empty
        hist_new = log.new_rows("histograms", c1, c2)
        assert sorted(set(hist_new["step"])) == [10, 15, 20]
        # Bucket selection and tails.
        only = log.new_rows("scalars", c1, c2, [("grad_norm", None)])
        assert set(only["instrument"]) == {"grad_norm"} and len(only) == 15 * (1 + len(PARAMS))
        tail = log.tail("scalars", [("loss", "all")], 4, c2)
        assert steps_of(tail) == [21, 22, 23, 24]
        touched = log.touched(c1, c2)
        assert ("scalars", "loss", "all") in touched
        assert ("histograms", "grad_hist_2d", PARAMS[0]) in touched
        assert log.touched(c2, c2) == set()
        assert log.max_step == 24
    finally:
        w.close()
    # Everything read equals what the reader of the log package reads.
    log, c3 = cache.get("r")
    full = log.frame("scalars", None, c3)
    reference = read_log(run)
    key = ["step", "instrument", "metric", "param"]
    mine = full.astype({c: str for c in ("instrument", "metric", "param")}).sort_values(key)
    theirs = reference.astype({c: str for c in ("instrument", "metric", "param")}).sort_values(key)
    np.testing.assert_array_equal(mine["value"].to_numpy(), theirs["value"].to_numpy())
    np.testing.assert_array_equal(mine["step"].to_numpy(), theirs["step"].to_numpy())
    hists = log.frame("histograms", None, c3)
    assert len(hists) == len(read_histograms(run))
    counts = hists[(hists["instrument"] == "grad_hist_2d")]["counts"].iloc[0]
    assert counts.shape == (8, 10)


def test_first_read_of_a_long_run_equals_the_incremental_read(root):
    cache = LogCache(root, min_refresh_s=0.0)
    with writer(root / "r") as w:
        write_steps(w, range(5))
        w.flush()
        log, _ = cache.get("r")  # first read: one scan of what is there
        for s in range(5, 40, 5):
            write_steps(w, range(s, s + 5))
            w.flush()
            log, c = cache.get("r")  # then segment by segment
    log, c = cache.get("r")
    incremental = log.frame("scalars", None, c)
    bulk_log, c_bulk = LogCache(root).get("r")  # a fresh cache reads the finished run at once
    assert c_bulk["scalars"] == c["scalars"]
    bulk = bulk_log.frame("scalars", None, c_bulk)
    key = ["step", "instrument", "param"]
    frames = [f.sort_values(key, kind="stable") for f in (bulk, incremental)]
    assert len(frames[0]) == len(frames[1]) == 40 * (3 + len(PARAMS))
    np.testing.assert_array_equal(frames[0]["value"].to_numpy(), frames[1]["value"].to_numpy())
    np.testing.assert_array_equal(frames[0]["step"].to_numpy(), frames[1]["step"].to_numpy())
    assert bulk["instrument"].dtype == "category"
    h_bulk = bulk_log.frame("histograms", [("grad_hist_2d", "all")], c_bulk)
    h_inc = log.frame("histograms", [("grad_hist_2d", "all")], c)
    assert list(h_bulk["step"]) == list(h_inc["step"]) == list(range(0, 40, 5))
    for a, b in zip(h_bulk["counts"], h_inc["counts"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_compaction_between_refreshes_neither_repeats_nor_drops_rows(root):
    run = root / "r"
    cache = LogCache(root, min_refresh_s=0.0)
    with writer(run) as w:
        write_steps(w, range(0, 8))
        w.flush()
        log, c1 = cache.get("r")
        write_steps(w, range(8, 20))
        w.flush()
    compact(run)
    assert any("-" in n[5:] for n in os.listdir(run / "scalars"))  # a merged file exists
    log, c2 = cache.get("r")
    assert steps_of(log.new_rows("scalars", c1, c2)) == list(range(8, 20))
    assert steps_of(log.frame("scalars", None, c2)) == list(range(20))


def test_many_clients_with_own_cursors_see_every_row_exactly_once(root):
    run = root / "r"
    cache = LogCache(root, min_refresh_s=0.0)
    w = writer(run)
    write_steps(w, range(2))
    w.flush()
    results: dict[int, list[int]] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def client(k: int) -> None:
        cursor, seen = None, []
        try:
            while True:
                done = stop.is_set()
                log, upto = cache.get("r")
                seen += steps_of(log.new_rows("scalars", cursor, upto))
                cursor = upto
                if done:
                    break
                time.sleep(0.001 * k)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        results[k] = seen

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for s in range(2, 120):
        write_steps(w, [s], hist_every=0)
        if s % 7 == 0:
            w.flush()
    w.close()
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    for seen in results.values():
        assert seen == list(range(120))  # in order, no duplicates, nothing missing


def test_deleted_and_replaced_runs(root):
    cache = LogCache(root, min_refresh_s=0.0)
    with writer(root / "r") as w:
        write_steps(w, range(5))
    log, c1 = cache.get("r")
    shutil.rmtree(root / "r")
    with pytest.raises(RunGone):
        cache.get("r")
    with pytest.raises(RunGone):
        log.refresh()
    assert "r" not in {r.run_id for r in cache.list_runs()}
    time.sleep(0.01)
    with writer(root / "r") as w:  # a new run under the same name
        write_steps(w, range(100, 103))
    log2, c2 = cache.get("r")
    assert c2["epoch"] != c1["epoch"]
    assert steps_of(log2.frame("scalars", None, c2)) == [100, 101, 102]


def test_cache_is_bounded_and_evicted_runs_come_back(root):
    for name in ("a", "b"):
        with writer(root / name) as w:
            write_steps(w, range(30))
    cache = LogCache(root, max_bytes=1)  # any run exceeds it: keep only the latest
    log_a, ca = cache.get("a")
    cache.get("b")
    assert cache.nbytes == cache.get("b")[0].nbytes
    log_a2, ca2 = cache.get("a")
    assert log_a2 is not log_a and ca2 == ca  # re-read from disk; the cursor is unchanged
    assert steps_of(log_a2.frame("scalars", None, ca2)) == list(range(30))


def test_refresh_is_throttled_but_never_stale_beyond_the_interval(root):
    cache = LogCache(root, min_refresh_s=0.3)
    w = writer(root / "r")
    try:
        write_steps(w, range(3))
        w.flush()
        log, c1 = cache.get("r")
        write_steps(w, range(3, 6))
        w.flush()
        _, c_same = cache.get("r")
        assert c_same == c1
        time.sleep(0.35)
        _, c2 = cache.get("r")
        assert steps_of(log.new_rows("scalars", c1, c2)) == [3, 4, 5]
    finally:
        w.close()


def test_params_and_tracked_come_from_the_metadata(root):
    with writer(root / "r") as w:
        write_steps(w, range(2))
    log, _ = LogCache(root).get("r")
    assert log.params() == list(PARAMS)
    assert log.tracked == {"loss", "grad_norm", "alpha", "grad_hist_1d"}


def test_keep_holds_only_the_named_buckets_from_bulk_and_incremental_reads(root):
    keep = {
        ("scalars", "loss", "all"),
        ("scalars", "grad_norm", None),
        ("histograms", "grad_hist_1d", PARAMS[1]),
    }
    cache = LogCache(root, min_refresh_s=0.0, keep=keep)
    w = writer(root / "r")
    try:
        write_steps(w, range(0, 10))
        w.flush()
        log, c1 = cache.get("r")  # the bulk scan
        write_steps(w, range(10, 20))
        w.flush()
        log, c2 = cache.get("r")  # segment by segment
    finally:
        w.close()
    for upto in (c1, c2):
        scalars = log.frame("scalars", None, upto)
        insts, params = scalars["instrument"].astype(str), scalars["param"].astype(str)
        pairs = set(zip(insts, params, strict=True))
        assert pairs == {("loss", "all"), ("grad_norm", "all")} | {("grad_norm", p) for p in PARAMS}
        hists = log.frame("histograms", None, upto)
        assert set(hists["instrument"].astype(str)) == {"grad_hist_1d"}
        assert set(hists["param"].astype(str)) == {PARAMS[1]}
    assert steps_of(log.frame("scalars", None, c2)) == list(range(20))
    assert steps_of(log.new_rows("scalars", c1, c2), "grad_norm", PARAMS[2]) == list(range(10, 20))
    assert log.frame("scalars", [("alpha", "all")], c2).empty  # read, not held
    assert log.max_step == 19
    assert log.params() == list(PARAMS)
    # Without keep, everything is held.
    everything, c = LogCache(root).get("r")
    assert {"alpha", "grad_norm", "loss"} <= set(everything.frame("scalars", None, c)["instrument"])


def test_needed_reads_cover_every_panel_the_hints_and_any_layer():
    from app.callbacks import needed_reads
    from app.layout import panel_reads

    panels = panel_catalog()
    reads = needed_reads(panels)
    for panel in panels:
        if not panel.layer:
            assert set(panel_reads(panel.spec)) <= reads, panel.name
    assert ("scalars", "grad_norm", None) in reads  # the per-layer gradient norm, any layer
    assert ("histograms", "grad_hist_2d", None) in reads  # the layer grid and the hints
    assert ("scalars", "alpha", "all") in reads
    assert ("scalars", "distance", None) not in reads  # per-tensor distances: no panel


def test_string_arrays_become_codes_whether_dictionary_encoded_or_not():
    import pyarrow as pa

    from app.data import _batch_codes

    plain = pa.array(["b", "a", "b", "c", "a"])
    for column in (plain, plain.dictionary_encode()):
        codes, names = _batch_codes(column)
        assert [names[c] for c in codes] == ["b", "a", "b", "c", "a"]
        assert len(set(names)) == len(names)


def test_list_rows_are_views_per_row_with_shapes_and_sliced_arrays():
    import pyarrow as pa

    from app.data import _list_rows, _shapes

    values = [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [], [7.0, 8.0]]
    rows = _list_rows(pa.array(values).slice(1))
    assert [r.tolist() for r in rows] == [[], [7.0, 8.0]]
    shapes = _shapes(pa.array([[2, 3], [2]]))
    assert shapes.tolist() == [(2, 3), (2,)]
    shaped = _list_rows(pa.array(values[:1] + values[2:]), shapes)
    assert shaped[0].shape == (2, 3) and shaped[0][1].tolist() == [4.0, 5.0, 6.0]
    assert shaped[1].tolist() == [7.0, 8.0]


def test_bulk_read_keeps_segment_order_and_the_highest_step_of_dropped_rows(root):
    from app.data import _bulk_read

    with writer(root / "r") as w:  # flushes every step: one segment per step
        write_steps(w, range(12))
        w.add_scalars(12, [("alpha", "alpha", "all", 0.0)])  # the last step: a dropped bucket
    keep = {
        ("scalars", "loss", "all"),
        ("scalars", "grad_norm", None),
        ("histograms", "grad_hist_1d", None),
    }
    scan = _bulk_read(root / "r", "scalars", keep)
    assert scan.max_step == 12
    assert set(scan.buckets) == {("loss", "all"), ("grad_norm", "all")} | {
        ("grad_norm", p) for p in PARAMS
    }
    loss = scan.buckets[("loss", "all")]
    assert loss.arrays["step"].tolist() == list(range(12)) and loss.names == ("loss",)
    assert scan.buckets[("grad_norm", PARAMS[1])].arrays["value"].tolist() == [
        0.5 + s for s in range(12)
    ]
    hists = _bulk_read(root / "r", "histograms", keep)
    assert set(hists.buckets) == {("grad_hist_1d", p) for p in ("all", *PARAMS)}
    one = hists.buckets[("grad_hist_1d", "all")]
    assert one.arrays["step"].tolist() == [0, 5, 10]
    assert all(c.shape == (20,) for c in one.arrays["counts"])
    nothing = _bulk_read(root / "r", "scalars", {("scalars", "absent", None)})
    assert nothing.buckets == {} and nothing.max_step == 12
    log, c = LogCache(root, keep=keep).get("r")
    assert log.max_step == 12
    only_scalars, _ = LogCache(root, keep={("scalars", "loss", "all")}).get("r")
    assert only_scalars.nbytes >= 12 * 8  # scalar rows count towards the cache bound


# --------------------------------------------------------------------------------------------
# The update logic through the real callback endpoint
# --------------------------------------------------------------------------------------------
def apply_extend(fig, payload):
    """What Plotly.extendTraces does with a dcc.Graph extendData payload."""
    update, indices, max_points = payload
    for k, i in enumerate(indices):
        for attr, values in update.items():
            fig["data"][i][attr] = (list(fig["data"][i][attr]) + list(values[k]))[-max_points:]


def test_tick_sends_only_new_points_and_grows_like_a_rebuild(root):
    w = writer(root / "r")
    try:
        write_steps(w, range(0, 30))
        w.flush()
        app = create_app(root, prewarm=False, snapshot_s=0.0)
        app.server.extensions["cockpit_cache"].min_refresh_s = 0.0
        page = flask_session(app)
        first = page.update("runs.value", runs=["r"], focus="r", smoothing=0.5)
        assert first["http"] == 200
        assert set(first["figure"]) == set(page.panels)
        loss = first["figure"]["performance"]
        assert len(loss["data"][0]["x"]) == 30
        assert page.update("tick", runs=["r"], focus="r", smoothing=0.5)["figure"] == {}

        write_steps(w, range(30, 37))
        w.flush()
        tick = page.update("tick", runs=["r"], focus="r", smoothing=0.5)
        assert tick["http"] == 200
        assert "performance" not in tick["figure"] and "distance" not in tick["figure"]
        payload = tick["extendData"]["performance"]
        assert all(len(xs) == 7 for xs in payload[0]["x"])  # only the 7 new steps
        assert payload[2] == MAX_POINTS
        apply_extend(loss, payload)
        rebuilt = page.update("smoothing.value", runs=["r"], focus="r", smoothing=0.5)
        fresh = rebuilt["figure"]["performance"]
        for grown, new in zip(loss["data"], fresh["data"], strict=True):
            np.testing.assert_allclose(grown["x"], new["x"])
            np.testing.assert_allclose(grown["y"], new["y"], rtol=1e-12)  # EMA continues
        # Snapshot panels (gauge, histograms) are rebuilt when their instrument got rows.
        write_steps(w, range(37, 41))
        w.flush()
        tick = page.update("tick", runs=["r"], focus="r", smoothing=0.5)
        assert "alpha" in tick["figure"] and "grad_hist_1d" in tick["figure"]
        assert "grad_hist_time" in tick["extendData"]  # heatmap rows appended
        assert tick["extendData"]["grad_hist_time"][0]["y"] == [[40]]
        assert "hess_max_ev" not in tick["figure"]  # not touched: nothing sent
        assert json.dumps(tick["state"]["cursors"]["r"])  # the cursor lives in the client
    finally:
        w.close()


def test_log_toggle_patches_axes_and_smoothing_changes_data(root):
    with writer(root / "r") as w:
        write_steps(w, range(0, 40))
    page = flask_session(create_app(root, prewarm=False))
    raw = page.update("runs.value", runs=["r"], focus="r", smoothing=0.0)
    assert [t["opacity"] for t in raw["figure"]["performance"]["data"]] == [1.0]
    smooth = page.update("smoothing.value", runs=["r"], focus="r", smoothing=0.9)
    traces = smooth["figure"]["performance"]["data"]
    assert len(traces) == 2 and traces[0]["opacity"] < 1.0  # faint raw, then smoothed
    assert not np.allclose(traces[0]["y"], traces[1]["y"])
    toggled = page.update(
        '{"name":"grad_norm","type":"log"}.value',
        runs=["r"],
        focus="r",
        smoothing=0.9,
        logs={"grad_norm": False},
    )
    patch = toggled["figure"]["grad_norm"]
    assert patch["__dash_patch_update"] == "__dash_patch_update"
    ops = {(tuple(o["location"]), json.dumps(o["params"])) for o in patch["operations"]}
    assert (("layout", "yaxis", "type"), '{"value": "linear"}') in ops
    assert set(toggled["figure"]) == {"grad_norm"}  # no other panel is touched


def test_refused_run_ids_are_never_read(root, tmp_path):
    outside = tmp_path / "outside"
    with writer(outside) as w:
        write_steps(w, range(5))
    (root / "link").symlink_to(outside, target_is_directory=True)
    page = flask_session(create_app(root, prewarm=False))
    for bad in ("../outside", str(outside), "link", ".."):
        answer = page.update("runs.value", runs=[bad], focus=bad)
        assert answer["http"] == 200
        loss = answer["figure"]["performance"]
        assert all(len(t.get("x", [])) == 0 for t in loss["data"])
        assert answer["state"]["cursors"] == {}


def test_an_instrument_needs_no_app_code(root):
    class Sharpness(Instrument):
        name = "sharpness"
        panel = PanelSpec("line", "curvature", "Sharpness", metrics=(), y_log=True)

    class TwoThings(Instrument):
        name = "two_things"
        panel = PanelSpec("line", "mystery", "Two things", metrics=("a", "b"))

    from instruments import INSTRUMENTS

    registry = {**INSTRUMENTS, "sharpness": Sharpness, "two_things": TwoThings}
    panels = {p.name: p for p in panel_catalog(registry)}
    assert panels["sharpness"].section == "curvature" and panels["sharpness"].spec.y_log
    assert panels["two_things.a"].section == "other" and panels["two_things.b"].spec.metric == "b"
    assert (
        not set(panels)
        - {p.name for p in panel_catalog()}
        - {"sharpness", "two_things.a", "two_things.b"}
    )
    meta = metadata(("loss", "sharpness"))
    with LogWriter(root / "r", meta) as w:
        for s in range(12):
            rows = [("loss", "loss", "all", 1.0), ("sharpness", "sharpness", "all", 2.0**s)]
            w.add_scalars(s, rows)
    page = flask_session(create_app(root, instruments=registry, prewarm=False))
    answer = page.update("runs.value", runs=["r"], focus="r")
    fig = answer["figure"]["sharpness"]
    assert fig["data"][0]["y"] == [2.0**s for s in range(12)]
    assert fig["layout"]["yaxis"]["type"] == "log"
    assert "compact" not in answer["className"]["sharpness"]
    # An instrument that was not tracked gets a compact "not tracked" card.
    assert "cp-compact" in answer["className"]["two_things.a"]
    assert "not tracked" in json.dumps(answer["figure"]["two_things.a"]["layout"])


def test_api_routes_refuse_everything_but_runs_under_the_root(root, tmp_path):
    with writer(root / "good") as w:
        write_steps(w, range(3))
    outside = tmp_path / "outside"
    with writer(outside) as w:
        write_steps(w, range(3))
    (root / "link").symlink_to(outside, target_is_directory=True)
    client = create_app(root, prewarm=False).server.test_client()
    assert [r["run_id"] for r in client.get("/api/runs").get_json()] == ["good"]
    ok = client.get("/api/runs/good")
    assert ok.status_code == 200 and ok.get_json()["status"] == "finished"
    assert set(ok.get_json()["instruments"]) >= {"loss", "grad_norm"}
    for path in (
        "/api/runs/..",
        "/api/runs/../outside",
        "/api/runs/..%2Foutside",
        "/api/runs/link",
        f"/api/runs/{outside}",
        f"/api/runs/%2F{str(outside)[1:]}",
        "/api/runs/missing",
        "/api/runs/good/..",
        "/api/runs/good%00",
    ):
        assert client.get(path, follow_redirects=True).status_code == 404, path


def test_frames_have_the_log_schema(root):
    with writer(root / "r") as w:
        write_steps(w, range(3))
    log, c = LogCache(root).get("r")
    frame = log.frame("scalars", [("loss", "all")], c)
    assert list(frame.columns) == ["step", "wall_time", "instrument", "metric", "param", "value"]
    assert frame["step"].dtype == np.int64 and isinstance(frame, pd.DataFrame)


def test_fast_extension_equals_the_reference(root):
    from app import figures as F
    from app.callbacks import extend_lines_fast

    cache = LogCache(root, min_refresh_s=0.0)
    w = writer(root / "r")
    try:
        write_steps(w, range(0, 30), instruments=("loss", "grad_norm", "alpha", "user"))
        for s in range(30):
            w.add_scalars(
                s,
                [
                    ("user", "accuracy", "all", s / 30),
                    ("hyperparameters", "lr", "group0", 0.1 / (1 + s)),
                ],
            )
        w.flush()
        log, c1 = cache.get("r")
        full = {"r": log.frame("scalars", None, c1)}
        states = {
            "perf": F.performance_figure(full, smoothing=0.7).layout.meta,
            "loss": F.line_figure(full, "loss", smoothing=0.6).layout.meta,
            "alpha": F.line_figure(full, "alpha").layout.meta,
            "norm_wall": F.line_figure(full, "grad_norm", smoothing=0.5, x="wall_time").layout.meta,
            "per_param": F.line_figure(full, "grad_norm", param=PARAMS[0]).layout.meta,
            "budget": F.line_figure(full, "loss", max_points=40).layout.meta,
            "hp": F.hyperparameter_figure(full).layout.meta,
            "other_run": F.line_figure({"q": full["r"]}, "loss").layout.meta,
            "empty": F.line_figure({"r": None}, "loss").layout.meta,
        }
        write_steps(w, range(30, 52), instruments=("loss", "grad_norm", "alpha", "user"))
        w.add_scalars(51, [("loss", "loss", "all", float("nan"))])  # step logged twice, NaN
        w.add_scalars(40, [("alpha", "alpha", "all", 0.5)])  # a late value for an early step
        w.add_scalars(
            52,
            [
                ("user", "val_accuracy", "all", 0.5),  # a new user metric
                ("hyperparameters", "lr", "group1", 0.01),
            ],
        )  # a new group
        w.flush()
        log, c2 = cache.get("r")
        frames = {"r": log.new_rows("scalars", c1, c2)}
        series = {"r": log.new_series(c1, c2)}
        outcomes = set()
        for name, state in states.items():
            ref_payload, ref_state = F.extend_lines(frames, state)
            payload, new_state = extend_lines_fast(series, state)
            assert json.dumps(new_state, sort_keys=True) == json.dumps(ref_state, sort_keys=True)
            ref = None if ref_payload is None else list(ref_payload)
            assert json.dumps(payload) == json.dumps(ref), name
            outcomes.add((name, "redraw" if new_state["redraw"] else "extend" if payload else "-"))
        assert outcomes >= {
            ("loss", "extend"),
            ("alpha", "extend"),
            ("perf", "redraw"),
            ("hp", "redraw"),
            ("budget", "redraw"),
            ("other_run", "redraw"),
        }
    finally:
        w.close()


def test_a_full_build_sends_no_nan_so_the_json_is_encoded_once(root):
    """Plotly's encoder decodes and re-encodes a whole answer that contains a NaN."""
    from app.callbacks import Updater, View

    with writer(root / "r") as w:
        write_steps(w, range(30))
        w.add_scalars(30, [("loss", "loss", "all", float("nan"))])  # a gap in a line
        empty_bins = np.zeros(20)
        empty_bins[3] = 5.0  # log colour: empty bins are blank cells
        w.add_histogram(30, "grad_hist_1d", "all", empty_bins, [np.linspace(-2, 2, 21)])
    cache = LogCache(root)
    updater = Updater(cache, panel_catalog())
    for smoothing in (0.0, 0.6):
        view = View(runs=("r",), focus="r", smoothing=smoothing, layer=PARAMS[0])
        result = updater.full(view)
        text = json.dumps(list(result.figures.values()), allow_nan=False)  # raises on NaN
        assert "null" in text  # the gaps and blank cells are still there, as null


def test_every_figure_the_server_sends_passes_plotly_validation(root):
    """The builders skip Plotly's validation for speed; what a full build sends is checked here."""
    import plotly.graph_objects as go

    from app.callbacks import Updater, View

    for name in ("a", "b"):
        with writer(root / name) as w:
            write_steps(w, range(30), instruments=("loss", "grad_norm", "alpha", "user"))
    updater = Updater(LogCache(root), panel_catalog())
    views = [
        View(runs=("a",), focus="a", smoothing=0.6, layer=PARAMS[0]),
        View(runs=("a", "b"), focus="b", x="wall_time", layer=PARAMS[1], logs={"grad_norm": True}),
        View(runs=("a",), focus="a"),  # no layer picked yet
    ]
    for view in views:
        for name, figure in updater.full(view).figures.items():
            try:
                go.Figure(figure)
            except (ValueError, TypeError) as exc:
                raise AssertionError(f"{name}: {exc}") from exc


def test_focus_change_rebuilds_only_single_run_panels_and_snapshots_are_throttled(root):
    for name in ("a", "b"):
        with writer(root / name) as w:
            write_steps(w, range(0, 20))
    page = flask_session(create_app(root, prewarm=False, snapshot_s=60.0))
    first = page.update("runs.value", runs=["a", "b"], focus="a")
    assert first["figure"]["alpha"]["layout"]["title"]["text"].endswith("— a")
    switched = page.update("focus.value", runs=["a", "b"], focus="b")
    rebuilt = set(switched["figure"])
    assert {"alpha", "gradient_tests", "grad_hist_1d", "layer_grid"} <= rebuilt
    assert not {"performance", "grad_norm", "tests_history"} & rebuilt  # overlays stay
    assert switched["figure"]["alpha"]["layout"]["title"]["text"].endswith("— b")
    assert switched["state"]["view"]["focus"] == "b"
    # New rows: lines grow, but the gauge waits for its snapshot interval (60 s here).
    w = writer(root / "b")
    try:
        write_steps(w, range(20, 26))
        w.flush()
        time.sleep(0.3)  # past the cache's refresh interval
        tick = page.update("tick", runs=["a", "b"], focus="b")
        assert "performance" in tick["extendData"] and "alpha" not in tick["figure"]
        assert tick["state"]["panels"]["alpha"]["dirty"] is True
    finally:
        w.close()


def test_malformed_control_values_fall_back_to_defaults(root):
    from app.callbacks import View

    view = View.parse(["a", 3, None, "a"], "zzz", "nan", "sideways", 17, {"p": "log", "q": ["log"]})
    assert view.runs == ("a",) and view.focus == "a" and view.smoothing == 0.0
    assert view.x == "step" and view.layer is None and view.logs == {"p": False, "q": True}
    assert View.parse("a", None, 5, "wall_time", "0.weight", {}).smoothing == 0.99
    with writer(root / "r") as w:
        write_steps(w, range(3))
    page = flask_session(create_app(root, prewarm=False))
    answer = page.update("runs.value", runs=["r"], focus="r", smoothing=-3, x="nope")
    assert answer["http"] == 200 and answer["state"]["view"]["smoothing"] == 0.0


def test_a_run_without_rows_yet_shows_no_data_yet(root):
    w = LogWriter(root / "fresh", metadata())  # meta.json and LOCK, no rows yet
    try:
        page = flask_session(create_app(root, prewarm=False))
        answer = page.update("runs.value", runs=["fresh"], focus="fresh")
        for name in ("performance", "alpha", "grad_hist_1d", "grad_norm"):
            assert "no data yet" in json.dumps(answer["figure"][name]["layout"]), name
        assert "not tracked" in json.dumps(answer["figure"]["hess_max_ev"]["layout"])
        assert answer["state"]["status"][0]["step"] is None
    finally:
        w.close()
