import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import app
from cockpit.cli import main, summarize
from cockpit.logreader import read_histograms, read_log
from cockpit.logwriter import LogWriter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "runs"
    with LogWriter(root / "first", {"tags": {"lr": 0.1}}, flush_every_steps=2) as log:
        for step in range(5):
            log.add_scalars(
                step,
                [
                    ("loss", "loss", "all", [3.0, 1.0, 2.0, 0.5, 0.75][step]),
                    ("grad_norm", "grad_norm", "all", float(step)),
                    ("grad_norm", "grad_norm", "0.weight", 100.0),  # not param "all"
                ],
            )
            log.add_histogram(step, "grad_hist_1d", "all", np.arange(3.0), [np.arange(4.0)])
            log.flush()  # one segment per step
        log.add_scalar(4, "alpha", "alpha", "all", float("nan"))
        log.add_event("warning", "alpha is undefined", step=4, instrument="alpha")
    LogWriter(root / "second").close()
    return root


def test_ls(root, capsys):
    assert main(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["run", "status", "steps", "last", "update"]
    assert lines[1].split()[:3] == ["first", "finished", "5"]
    assert lines[2].split()[:3] == ["second", "finished", "0"]


def test_ls_empty_and_missing_root(tmp_path, capsys):
    assert main(["ls", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out
    assert main(["ls", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "nope") in err


def test_summary(root, capsys):
    assert main(["summary", str(root / "first")]) == 0
    out = capsys.readouterr().out
    assert "tags" in out and '"lr": 0.1' in out
    assert "alpha is undefined" in out and "warning" in out and "step 4" in out
    summary = summarize(root / "first").set_index(["instrument", "metric"])
    loss = summary.loc[("loss", "loss")]
    assert (loss["last"], loss["min"], loss["max"], loss["rows"], loss["last_step"]) == (
        0.75,
        0.5,
        3.0,
        5,
        4,
    )
    assert summary.loc[("grad_norm", "grad_norm"), "max"] == 4.0  # param "all" only
    assert math.isnan(summary.loc[("alpha", "alpha"), "last"])


def test_summary_of_missing_or_non_run(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["summary", str(tmp_path)]) == 2
    assert "not a cockpit run" in capsys.readouterr().err


def test_export_csv_and_parquet(root, tmp_path, capsys):
    run = root / "first"
    assert main(["export", str(run), "--format", "csv", "--out", str(tmp_path / "s.csv")]) == 0
    assert "wrote 16 scalars rows" in capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "s.csv")
    expected = read_log(run)
    assert csv["step"].tolist() == expected["step"].tolist()
    np.testing.assert_array_equal(csv["value"].to_numpy(), expected["value"].to_numpy())

    out = tmp_path / "s.parquet"
    assert main(["export", str(run), "--format", "parquet", "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), expected, check_dtype=False)

    hist_csv = tmp_path / "h.csv"
    args = ["export", str(run), "--table", "histograms", "--format", "csv", "--out", str(hist_csv)]
    assert main(args) == 0
    hist = pd.read_csv(hist_csv)
    assert json.loads(hist["counts"].iloc[0]) == [0.0, 1.0, 2.0]
    assert json.loads(hist["shape"].iloc[0]) == [3]
    hist_parquet = tmp_path / "h.parquet"
    args[-3:] = ["parquet", "--out", str(hist_parquet)]
    assert main(args) == 0
    assert pd.read_parquet(hist_parquet)["counts"].iloc[0].tolist() == [0.0, 1.0, 2.0]

    events = tmp_path / "e.csv"
    assert (
        main(["export", str(run), "--table", "events", "--format", "csv", "--out", str(events)])
        == 0
    )
    assert pd.read_csv(events)["message"].tolist() == ["alpha is undefined"]


def test_export_errors(root, tmp_path, capsys):
    assert main(["export", str(root / "first"), "--format", "xlsx", "--out", "x"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    missing_dir = tmp_path / "no" / "such" / "out.csv"
    args = ["export", str(root / "first"), "--format", "csv", "--out", str(missing_dir)]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compact(root, capsys):
    run = root / "first"
    before, hist_before = read_log(run), read_histograms(run)
    assert len(list((run / "scalars").glob("part-*.parquet"))) > 1
    assert main(["compact", str(run)]) == 0
    assert "scalars: merged" in capsys.readouterr().out
    names = [p.name for p in (run / "scalars").glob("part-*.parquet")]
    assert len(names) == 1 and names[0].startswith("part-000000-"), names
    pd.testing.assert_frame_equal(read_log(run), before)
    assert len(read_histograms(run)) == len(hist_before)
    assert main(["compact", str(run)]) == 0
    assert "scalars: nothing to compact" in capsys.readouterr().out
    assert main(["compact", str(root / "nope")]) == 2


def test_dashboard_calls_app_serve(root, monkeypatch):
    calls = []
    monkeypatch.setattr(app, "serve", lambda *a, **k: calls.append((a, k)), raising=False)
    args = ["dashboard", str(root), "--host", "0.0.0.0", "--port", "9000", "--refresh", "0.5"]
    assert main(args) == 0
    assert calls == [((root,), {"host": "0.0.0.0", "port": 9000, "refresh_s": 0.5})]
    calls.clear()
    assert main(["dashboard", str(root)]) == 0
    assert calls == [((root,), {"host": "127.0.0.1", "port": 8050, "refresh_s": 2.0})]


def test_dashboard_errors(root, tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(app, "serve", raising=False)
    assert main(["dashboard", str(root)]) == 2
    assert "no serve() function" in capsys.readouterr().err
    monkeypatch.setattr(app, "serve", lambda *a, **k: None, raising=False)
    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_usage_errors(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "dashboard" in capsys.readouterr().out


def test_module_entry_point(root):
    result = subprocess.run(
        [sys.executable, "-m", "cockpit.cli", "ls", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "first" in result.stdout and "finished" in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "cockpit.cli", "summary", str(root / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
