"""Smoke runs of the examples in a temporary log root; the bug hunts assert their claims.

Each bug hunt trains a healthy and a broken twin and claims that one instrument tells them
apart; the tests check those claims with a margin, at the settings the examples' docstrings
quote for the tests (seed 0, 60 steps). The examples run in-process through ``main(argv)``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cockpit.logreader import list_runs, read_histograms, read_log
from examples import (
    _common,
    bug_learning_rate,
    bug_unnormalized_inputs,
    bug_vanishing_gradients,
    posthoc,
    quickstart,
    resnet_adam,
    transformer_lm,
)
from instruments import INSTRUMENTS, PRESETS

REPO = Path(__file__).resolve().parents[2]
ECONOMY = {
    "alpha",
    "distance",
    "grad_norm",
    "inner_test",
    "loss",
    "norm_test",
    "ortho_test",
    "update_size",
}


@pytest.fixture(autouse=True)
def _one_thread():
    # The examples' models are tiny; on a shared 2-core machine, torch's intra-op threads
    # contend with other processes and make steps 5-25x slower, so the tests use one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def instruments_of(run) -> set[str]:
    return set(read_log(run).instrument)


def series(run, instrument, metric=None, param="all") -> np.ndarray:
    df = read_log(run, instruments=instrument)
    df = df[(df.metric == (metric or instrument)) & (df.param == param)]
    return df.value.to_numpy(dtype=float)


# --------------------------------------------------------------------------- quickstart
def test_quickstart_trains_with_the_economy_instruments(tmp_path):
    result = quickstart.main(["--steps", "40", "--logdir", str(tmp_path)])
    run = result["run"]
    assert run == tmp_path / "digits-cnn"
    assert ECONOMY <= instruments_of(run)
    loss = series(run, "loss")
    assert len(loss) == 40 and np.isfinite(loss).all()
    assert np.median(loss[-10:]) < 0.5 * loss[0]
    accuracy = series(run, "user", "accuracy")
    assert len(accuracy) == 40 and np.median(accuracy[-10:]) > 0.5
    hists = read_histograms(run, instrument="grad_hist_1d", param="all")
    assert len(hists) == 40 and hists.counts.iloc[0].sum() > 0
    assert result["latest"]["loss"] == pytest.approx(loss[-1])
    assert {"alpha", "norm_test", "user.accuracy"} <= set(result["latest"])


def test_quickstart_user_code_is_at_most_30_lines():
    source = Path(quickstart.__file__).read_text().splitlines()
    start = next(i for i, line in enumerate(source) if "copy from here" in line)
    end = next(i for i, line in enumerate(source) if "to here" in line)
    code = [line for line in source[start + 1 : end] if line.strip()]
    assert 10 < len(code) <= 30


def test_an_example_runs_as_a_script_file(tmp_path):
    # python examples/quickstart.py: the examples import their helpers without the package.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--steps", "3", "--logdir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cockpit dashboard" in proc.stderr  # reported through logging
    assert len(series(tmp_path / "digits-cnn", "loss")) == 3


def test_runs_are_not_silently_continued(tmp_path):
    run = _common.fresh_run(tmp_path, "r")
    (run / "meta.json").parent.mkdir(parents=True)
    (run / "meta.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _common.fresh_run(tmp_path, "r")
    assert _common.fresh_run(tmp_path, "r", overwrite=True) == run and not run.exists()
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(FileExistsError, match="not a cockpit run"):
        _common.fresh_run(tmp_path, "not-a-run", overwrite=True)
    assert (tmp_path / "not-a-run").exists()


def test_data_helpers():
    x, y, xt, yt = _common.digits()
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-4)
    raw = _common.digits(flat=True, normalize=False)[0]
    assert raw.shape[1] == 64 and float(raw.min()) == 0.0 and float(raw.max()) == 16.0
    corpus = _common.char_corpus()
    assert len(corpus.text) > 5000 and corpus.decode(corpus.ids[:50]) == corpus.text[:50]
    xb, yb = corpus.windows(4, 16, torch.Generator().manual_seed(0))
    assert xb.shape == yb.shape == (4, 16) and torch.equal(xb[:, 1:], yb[:, :-1])


# ---------------------------------------------------------------------------- bug hunts
def test_unnormalized_inputs_pile_into_the_edge_bins(tmp_path):
    result = bug_unnormalized_inputs.main(["--steps", "60", "--logdir", str(tmp_path)])
    mass = result["edge_mass"]
    assert set(list_runs(tmp_path).run_id) == {"healthy", "broken"}
    # measured over seeds 0-3: broken 1.6-2.0 %, healthy 0.02-0.03 %, ratio 62-84
    assert mass["broken"] >= 10 * mass["healthy"]
    assert mass["broken"] > 0.005 and mass["healthy"] < 0.001
    # the spikes come from the first layer, which sees the raw inputs
    assert result["first_layer_edge_mass"]["broken"] > 0.005
    assert result["first_layer_edge_mass"]["healthy"] < 0.0005
    assert "edge_bins" not in result["hints"]["healthy"]


def test_large_learning_rate_shows_in_alpha_while_the_loss_falls(tmp_path):
    result = bug_learning_rate.main(["--steps", "60", "--logdir", str(tmp_path)])
    alpha, loss = result["alpha"], result["loss"]
    # measured over seeds 0-3: broken 0.91-0.95, healthy -0.15 to -0.10
    assert alpha["broken"] > 0.5
    assert alpha["healthy"] < 0.2
    # the loss of the broken twin still falls at first
    assert loss["broken"]["steps_10_19"] < 0.6 * loss["broken"]["start"]
    assert loss["broken"]["last_10"] < loss["broken"]["start"]
    assert "alpha_high" in result["hints"]["broken"]
    assert "alpha_high" not in result["hints"]["healthy"]
    # alpha is logged per step and finite for all but the last step
    assert np.isfinite(series(result["runs"]["broken"], "alpha")).sum() == 59


def test_deep_sigmoid_gradients_vanish_layer_by_layer(tmp_path):
    result = bug_vanishing_gradients.main(["--steps", "60", "--logdir", str(tmp_path)])
    mass = result["central_mass"]
    first = result["first_layer"]
    # measured over seeds 0-3: broken 1.00, healthy 0.52-0.57
    assert first["broken"] >= 0.9
    assert first["healthy"] <= 0.75
    assert first["broken"] - first["healthy"] >= 0.25
    # the first seven hidden layers of the sigmoid twin all collapse; its output layer does not
    for index in (1, 3, 5, 7, 9, 11, 13):
        assert mass["broken"][f"{index}.weight"] >= 0.99, index
    assert mass["broken"]["17.weight"] < 0.5
    assert max(m for p, m in mass["healthy"].items() if p != "all") < 0.8
    assert "vanishing" in result["hints"]["broken"]
    assert "vanishing" not in result["hints"]["healthy"]
    assert result["final_loss"]["broken"] > 2.0  # stuck at chance, ln 10 = 2.30
    assert result["test_accuracy"]["healthy"] > result["test_accuracy"]["broken"] + 0.3
    hists = read_histograms(result["runs"]["broken"], instrument="grad_hist_2d", param="1.weight")
    assert hists["shape"].iloc[0] == (40, 50)


# ------------------------------------------------------------------- other architectures
def test_resnet_with_adam_and_the_business_preset(tmp_path):
    result = resnet_adam.main(["--steps", "12", "--logdir", str(tmp_path)])
    logged = set(result["instruments"])
    assert ECONOMY <= logged
    expected_missing = [n for n in resnet_adam.CURVATURE if n not in INSTRUMENTS]
    assert result["missing"] == expected_missing
    for name in PRESETS["business"]:
        if name in INSTRUMENTS:
            assert name in logged, name
    loss = series(result["run"], "loss")
    assert len(loss) == 12 and np.isfinite(loss).all()
    assert np.isfinite(series(result["run"], "alpha")).sum() == 11
    per_param = set(read_log(result["run"], instruments="grad_norm").param)
    assert {"blocks.2.shortcut.0.weight", "blocks.0.norm1.weight", "head.weight"} <= per_param


def test_transformer_language_model(tmp_path):
    result = transformer_lm.main(["--steps", "8", "--logdir", str(tmp_path)])
    run = result["run"]
    assert ECONOMY <= instruments_of(run)
    loss = series(run, "loss")
    assert len(loss) == 8 and np.isfinite(loss).all()
    assert loss[0] == pytest.approx(math.log(result["vocab"]), rel=0.1)  # uniform at the start
    assert np.isfinite(series(run, "alpha")).sum() == 7
    # a sample is one sequence: the CE on N*T rows is grouped back into N = 16 samples
    assert series(run, "hyperparameters", "batch_size") == pytest.approx([16.0] * 8)
    per_param = set(read_log(run, instruments="grad_norm").param)
    assert {
        "embed.weight",  # tied with the head: one parameter
        "pos.weight",
        "layers.0.self_attn.in_proj_weight",
        "layers.1.self_attn.out_proj.weight",
        "layers.0.norm1.weight",
        "norm.weight",
    } <= per_param
    assert "head.weight" not in per_param
    assert np.isfinite(result["val_loss"]) and result["sample"].startswith("The ")


# ------------------------------------------------------------------------------ post hoc
def test_posthoc_compares_runs_and_writes_a_table_and_a_figure(tmp_path):
    root = tmp_path / "sweep"
    result = posthoc.main(["--steps", "30", "--logdir", str(root)])
    table = result["table"]
    assert list(table.index) == ["sgd-lr0.01", "sgd-lr0.05", "sgd-lr0.2"]
    assert ("alpha", "median") in table.columns and ("loss", "last") in table.columns
    assert (table[("run", "steps")] == 30).all()
    distance = table[("distance", "median")].to_numpy()
    assert (np.diff(distance) > 0).all()  # larger learning rates travel farther
    last_loss = read_log(root / "sgd-lr0.2", instruments="loss").value.iloc[-1]
    assert table.loc["sgd-lr0.2", ("loss", "last")] == pytest.approx(last_loss)
    saved = pd.read_csv(result["csv"], header=[0, 1], index_col=0)
    assert saved.shape == table.shape
    html = result["html"].read_text()
    assert "plotly" in html and "sgd-lr0.05" in html
    # analyze existing runs without training: same runs, same table
    again = posthoc.main(["--runs", str(root), "--logdir", str(tmp_path / "report")])
    assert again["runs"] == result["runs"]
    pd.testing.assert_frame_equal(again["table"], table)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "comparison.csv",
        "comparison.html",
    ]
