"""Tests of app.hints: every rule fires on data made to trigger it and stays quiet otherwise."""

import numpy as np
import pandas as pd
import pytest

from app.hints import Hint, HintThresholds, hints

COLUMNS = ["step", "wall_time", "instrument", "metric", "param", "value"]
RNG = np.random.default_rng(0)


def rows(instrument, values, metric=None, param="all", start=0):
    metric = instrument if metric is None else metric
    return [
        (start + k, 1.7e9 + start + k, instrument, metric, param, float(v))
        for k, v in enumerate(values)
    ]


def frame(*parts):
    return pd.DataFrame([r for p in parts for r in p], columns=COLUMNS)


def hist_frame(records):
    """records: (step, instrument, param, counts, edges_0, edges_1)."""
    return pd.DataFrame(
        [
            (s, 1.7e9 + s, i, p, np.asarray(c, float), np.asarray(a, float), np.asarray(b, float))
            for s, i, p, c, a, b in records
        ],
        columns=["step", "wall_time", "instrument", "param", "counts", "edges_0", "edges_1"],
    )


def rules(found):
    return [h.rule for h in found]


def by_rule(found, rule):
    matches = [h for h in found if h.rule == rule]
    assert len(matches) == 1, found
    return matches[0]


def test_no_data_no_hints():
    assert hints(None) == []
    assert hints(frame()) == []
    assert hints(frame(rows("loss", np.linspace(1, 0.1, 50)))) == []


# ------------------------------------------------------------------------------------ alpha
def test_alpha_too_large():
    df = frame(rows("alpha", RNG.normal(1.1, 0.3, 300)))
    hint = by_rule(hints(df), "alpha_high")
    assert hint.level == "warning" and hint.instrument == "alpha"
    assert "too large" in hint.text


def test_alpha_too_small():
    hint = by_rule(hints(frame(rows("alpha", RNG.normal(-0.95, 0.05, 300)))), "alpha_low")
    assert "too small" in hint.text


def test_alpha_fine_or_only_in_the_past():
    assert hints(frame(rows("alpha", RNG.normal(0.0, 0.3, 300)))) == []
    # overshooting long ago, fine over the last 200 tracked steps
    past = np.concatenate([np.full(500, 1.2), RNG.normal(0.0, 0.3, 200)])
    assert hints(frame(rows("alpha", past)), window=200) == []
    assert rules(hints(frame(rows("alpha", past)), window=600)) == ["alpha_high"]
    # too few tracked values to say anything, NaNs do not count
    assert hints(frame(rows("alpha", [1.5, 1.5, np.nan, np.nan, np.nan, 1.5]))) == []
    # thresholds are configurable
    df = frame(rows("alpha", np.full(50, 0.8)))
    assert rules(hints(df)) == ["alpha_high"]
    assert hints(df, thresholds=HintThresholds(alpha_high=0.9)) == []


# ------------------------------------------------------------------------------------ distance
def test_distance_growing_with_nonzero_updates():
    steps = np.arange(300)
    df = frame(rows("distance", 1.0 + 0.05 * steps), rows("update_size", np.full(300, 0.05)))
    hint = by_rule(hints(df), "distance_growing")
    assert hint.level == "info" and "valley" in hint.text


def test_distance_flat_with_nonzero_updates_is_diffusion():
    df = frame(
        rows("distance", 5.0 + 1e-3 * RNG.standard_normal(300)),
        rows("update_size", np.full(300, 0.05)),
    )
    hint = by_rule(hints(df), "diffusion")
    assert "diffuse" in hint.text


def test_distance_quiet_when_updates_vanish_or_distance_moves_moderately():
    flat_still = frame(rows("distance", np.full(300, 5.0)), rows("update_size", np.zeros(300)))
    assert hints(flat_still) == []
    # flat, and the updates are far too small to have moved it anyway: standing still
    tiny = frame(rows("distance", np.full(300, 5.0)), rows("update_size", np.full(300, 1e-6)))
    assert hints(tiny) == []
    # a 3 % change: neither flat (< 1 %) nor growing (> 5 %)
    moderate = frame(
        rows("distance", np.linspace(5.0, 5.15, 300)), rows("update_size", np.full(300, 0.05))
    )
    assert hints(moderate) == []


# ------------------------------------------------------------------------------- gradient tests
def test_noisy_gradients_suggest_a_larger_batch():
    df = frame(
        rows("norm_test", np.full(100, 2.0)),
        rows("inner_test", np.full(100, 0.5)),
        rows("ortho_test", np.full(100, 1.0)),
        rows("batch_size", np.full(100, 512.0), metric="norm_test"),
        rows("batch_size", np.full(100, 20.0), metric="inner_test"),
        rows("hyperparameters", np.full(100, 64.0), metric="batch_size"),
    )
    hint = by_rule(hints(df), "noisy_gradients")
    assert hint.level == "warning" and hint.instrument == "norm_test"
    assert "larger batch" in hint.text and "norm test 2.00 > 0.90" in hint.text
    assert "512" in hint.text and "currently 64" in hint.text
    assert "inner" not in hint.text


def test_ortho_test_uses_tan_80_degrees():
    assert rules(hints(frame(rows("ortho_test", np.full(50, 6.0))))) == ["noisy_gradients"]
    assert hints(frame(rows("ortho_test", np.full(50, 5.5)))) == []


def test_quiet_gradient_tests():
    df = frame(rows("norm_test", np.full(100, 0.5)), rows("inner_test", np.full(100, 0.85)))
    assert hints(df) == []


# ------------------------------------------------------------------------------------ histograms
EDGES_1D = np.linspace(-2, 2, 101)


def test_edge_bins_flag_exploding_gradients():
    counts = np.ones(100)
    counts[0] = counts[-1] = 15.0  # 30 of 128: 23 % in the edge bins
    h = hist_frame(
        [
            (0, "grad_hist_1d", "all", np.ones(100), EDGES_1D, []),
            (5, "grad_hist_1d", "all", counts, EDGES_1D, []),
        ]
    )
    hint = by_rule(hints(frame(), hists=h), "edge_bins")
    assert hint.level == "warning" and "all parameters" in hint.text
    assert "exploding" in hint.text and "23%" in hint.text


def test_edge_bins_quiet_for_a_contained_histogram_or_an_old_problem():
    exploded = np.zeros(100)
    exploded[[0, -1]] = 50.0
    bell = np.exp(-(np.linspace(-4, 4, 100) ** 2)) * 1000
    h = hist_frame(
        [
            (0, "grad_hist_1d", "all", exploded, EDGES_1D, []),
            (9, "grad_hist_1d", "all", bell, EDGES_1D, []),
        ]
    )
    assert hints(frame(), hists=h) == []


def layer(central):
    """A [40, 50] 2D histogram with the given share in the two central gradient bins."""
    c = np.full((40, 50), (1 - central) / (38 * 50))
    c[19:21, :] = central / 100
    return c * 1e4


E_G, E_P = np.linspace(-1, 1, 41), np.linspace(-2, 2, 51)


def test_vanishing_gradients_name_the_layers():
    h = hist_frame(
        [
            (3, "grad_hist_2d", "all", layer(0.5), E_G, E_P),
            (3, "grad_hist_2d", "0.weight", layer(0.3), E_G, E_P),
            (3, "grad_hist_2d", "2.weight", layer(0.999), E_G, E_P),
            (3, "grad_hist_2d", "4.weight", layer(1.0), E_G, E_P),
        ]
    )
    hint = by_rule(hints(frame(), hists=h), "vanishing")
    assert hint.level == "warning" and hint.instrument == "grad_hist_2d"
    assert "2.weight, 4.weight" in hint.text and "0.weight" not in hint.text


def test_vanishing_everywhere_is_only_info_and_healthy_layers_are_quiet():
    everywhere = hist_frame(
        [
            (3, "grad_hist_2d", "0.weight", layer(0.995), E_G, E_P),
            (3, "grad_hist_2d", "2.weight", layer(1.0), E_G, E_P),
        ]
    )
    hint = by_rule(hints(frame(), hists=everywhere), "vanishing_everywhere")
    assert hint.level == "info"
    healthy = hist_frame(
        [
            (3, "grad_hist_2d", "0.weight", layer(0.2), E_G, E_P),
            (3, "grad_hist_2d", "2.weight", layer(0.9), E_G, E_P),
        ]
    )
    assert hints(frame(), hists=healthy) == []


def test_vanishing_falls_back_to_per_layer_1d_histograms():
    vanished = np.zeros(100)
    vanished[49:51] = 100.0
    h = hist_frame(
        [
            (0, "grad_hist_1d", "0.weight", np.ones(100), EDGES_1D, []),
            (0, "grad_hist_1d", "1.weight", vanished, EDGES_1D, []),
        ]
    )
    hint = by_rule(hints(frame(), hists=h), "vanishing")
    assert hint.instrument == "grad_hist_1d" and "1.weight" in hint.text


# ------------------------------------------------------------------------------------ curvature
def test_max_eigenvalue_rising_before_the_loss():
    df = frame(
        rows("hess_max_ev", np.linspace(1.0, 4.0, 200)),
        rows("loss", 0.5 + 0.01 * RNG.standard_normal(200)),
    )
    hint = by_rule(hints(df), "max_ev_rising")
    assert hint.level == "info" and hint.instrument == "hess_max_ev"


def test_max_eigenvalue_quiet_when_flat_or_when_the_loss_already_rose():
    flat = frame(rows("hess_max_ev", np.full(200, 3.0)), rows("loss", np.full(200, 0.5)))
    assert hints(flat) == []
    both = frame(
        rows("hess_max_ev", np.linspace(1.0, 4.0, 200)), rows("loss", np.linspace(0.5, 2.0, 200))
    )
    assert hints(both) == []
    no_loss = frame(rows("hess_max_ev", np.linspace(1.0, 4.0, 200)))
    assert hints(no_loss) == []


# ------------------------------------------------------------------------------- early stopping
def test_early_stopping_signal():
    assert rules(hints(frame(rows("early_stopping", np.full(50, 0.3))))) == ["early_stopping"]
    assert hints(frame(rows("early_stopping", np.full(50, -2.0)))) == []


# ------------------------------------------------------------------------------------ ordering
def test_warnings_come_first():
    df = frame(
        rows("early_stopping", np.full(50, 0.3)),
        rows("alpha", np.full(50, 1.2)),
    )
    found = hints(df)
    assert [h.level for h in found] == ["warning", "info"]
    assert all(isinstance(h, Hint) and h.text for h in found)


@pytest.mark.parametrize("window", [1, 10, 1000])
def test_window_sizes_do_not_break(window):
    df = frame(
        rows("alpha", np.full(20, 1.2)),
        rows("distance", np.arange(20.0)),
        rows("update_size", np.ones(20)),
    )
    found = hints(df, window=window)
    assert ("alpha_high" in rules(found)) == (window >= 5)
