"""Plain-language hints from the logged instruments, following how the Cockpit view is read.

Each rule looks at the last ``window`` *tracked* values of its instruments (the last ``window``
finite values, not the last ``window`` steps, so sparse or log-spaced schedules still get a
window) and fires on documented thresholds, all collected in :class:`HintThresholds`:

* **alpha** — median α over the window > ``alpha_high`` (0.5): steps land on or beyond the far
  side of the local parabola (α ≈ +1), "learning rate probably too large"; median α <
  ``alpha_low`` (−0.5): steps barely move along it (α ≈ −1), "learning rate probably too small".
* **distance** — with non-zero updates (median ``update_size`` > 0), the distance from the
  initialization grew by more than ``distance_growth`` (5 %) of its current value over the
  window: still moving along the valley walls; or it changed by less than ``distance_flat``
  (1 %) although the updates over the window add up to at least ``diffusion_path`` (10 %) of the
  distance (path ≈ median update × steps elapsed): the steps cancel out, diffusion.
* **gradient tests** — median norm/inner/ortho test over the window above its reference
  threshold (0.9, 0.9, tan 80°): noisy gradients, a larger batch helps; quotes the suggested
  batch size (``batch_size/<test>``, latest) and the actual one (``hyperparameters/batch_size``).
* **grad_hist_1d** — the latest 1D histogram has more than ``edge_mass`` (5 %) of its mass in
  the two edge bins (where out-of-range values are clamped): unnormalized inputs or exploding
  gradients.
* **grad_hist_2d** — in the latest per-layer histograms (2D, else per-layer 1D), a layer with at
  least ``central_mass`` (99 %) of its gradient mass in the central bin(s): vanishing gradients
  there. If every layer is flagged the hint is ``"info"``: gradients may just be small late in
  training.
* **hess_max_ev** — the median of the last third of the window is at least ``ev_rise`` (1.5×)
  the median of the first third while the loss over the same steps has not risen (ratio ≤
  ``loss_flat``, 1.05): curvature often moves first, a loss spike may follow.
* **early_stopping** — median criterion over the window > 0: the gradient is consistent with
  noise, the stop signal of Mahsereci et al.

No Dash here; the dashboard renders the returned :class:`Hint` objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from app.transforms import (
    HistRecord,
    central_mass,
    edge_mass,
    latest_hists_by_param,
    latest_value,
    tail_values,
)

__all__ = ["Hint", "HintThresholds", "hints"]

Level = Literal["info", "warning"]


@dataclass(frozen=True)
class Hint:
    """One diagnostic hint.

    Attributes:
        level: ``"warning"`` (probably needs action) or ``"info"``.
        instrument: The instrument the hint is about (for linking it to a panel).
        text: The hint, one or two plain sentences with the numbers behind it.
        rule: Stable id of the rule that fired (e.g. ``"alpha_high"``), for keys and tests.

    Example:
        >>> import pandas as pd
        >>> from app.hints import Hint, HintThresholds, hints
        >>> df = pd.DataFrame({  # six tracked steps with α around 0.7
        ...     "step": range(6), "wall_time": 0.0, "instrument": "alpha", "metric": "alpha",
        ...     "param": "all", "value": [0.6, 0.7, 0.8, 0.7, 0.6, 0.7],
        ... })
        >>> [h.rule for h in hints(df)]
        ['alpha_high']
        >>> hints(df)[0].level, hints(df)[0].instrument
        ('warning', 'alpha')

    """

    level: Level
    instrument: str
    text: str
    rule: str = ""


@dataclass(frozen=True)
class HintThresholds:
    """Thresholds of the hint rules (see the module docstring for what each one means).

    Attributes:
        min_points: Fewest tracked values a rule needs before it says anything.
        alpha_high: Median α above this: learning rate too large.
        alpha_low: Median α below this: learning rate too small.
        distance_growth: Relative growth of the distance over the window counted as growing.
        distance_flat: Relative change of the distance below which it counts as flat.
        diffusion_path: Path length (relative to the distance) needed to call a flat distance
            diffusion rather than standing still.
        norm_test: Reference threshold of the norm test.
        inner_test: Reference threshold of the inner-product test.
        ortho_test: Reference threshold of the orthogonality test (tan 80°).
        edge_mass: Fraction of mass in the two edge bins of a 1D histogram that is too much.
        central_mass: Fraction of a layer's gradient mass in the central bin(s) that counts as
            vanished.
        ev_rise: Ratio of late to early max-eigenvalue medians counted as rising.
        loss_flat: Largest late/early ratio of loss medians counted as "not risen yet".

    Example:
        >>> import pandas as pd
        >>> from app.hints import Hint, HintThresholds, hints
        >>> df = pd.DataFrame({  # six tracked steps with α around 0.7
        ...     "step": range(6), "wall_time": 0.0, "instrument": "alpha", "metric": "alpha",
        ...     "param": "all", "value": [0.6, 0.7, 0.8, 0.7, 0.6, 0.7],
        ... })
        >>> len(hints(df, thresholds=HintThresholds(alpha_high=0.8)))  # a more tolerant reader
        0
        >>> hints(df, thresholds=HintThresholds(min_points=10))  # too few tracked values yet
        []

    """

    min_points: int = 5
    alpha_high: float = 0.5
    alpha_low: float = -0.5
    distance_growth: float = 0.05
    distance_flat: float = 0.01
    diffusion_path: float = 0.1
    norm_test: float = 0.9
    inner_test: float = 0.9
    ortho_test: float = math.tan(math.radians(80.0))
    edge_mass: float = 0.05
    central_mass: float = 0.99
    ev_rise: float = 1.5
    loss_flat: float = 1.05


_Rule = Callable[[pd.DataFrame, pd.DataFrame | None, int, HintThresholds], list[Hint]]


def _alpha(
    df: pd.DataFrame, hists: pd.DataFrame | None, window: int, th: HintThresholds
) -> list[Hint]:
    _, a = tail_values(df, "alpha", window=window)
    if a.size < th.min_points:
        return []
    med = float(np.median(a))
    if med > th.alpha_high:
        return [
            Hint(
                "warning",
                "alpha",
                (
                    f"Median α = {med:.2f} over the last {a.size} tracked steps: steps overshoot "
                    "the "
                    "local minimum (α ≈ +1 or above). The learning rate is probably too large."
                ),
                "alpha_high",
            )
        ]
    if med < th.alpha_low:
        return [
            Hint(
                "warning",
                "alpha",
                (
                    f"Median α = {med:.2f} over the last {a.size} tracked steps: steps barely move "
                    "down the local parabola (α ≈ −1). The learning rate is probably too small."
                ),
                "alpha_low",
            )
        ]
    return []


def _distance(
    df: pd.DataFrame, hists: pd.DataFrame | None, window: int, th: HintThresholds
) -> list[Hint]:
    steps, d = tail_values(df, "distance", window=window)
    _, u = tail_values(df, "update_size", window=window)
    if d.size < th.min_points or u.size < th.min_points:
        return []
    u_med = float(np.median(u))
    scale = float(abs(d[-1]))
    if u_med <= 0.0 or scale <= 0.0:
        return []
    change = float(d[-1] - d[0])
    elapsed = float(steps[-1] - steps[0])
    path = u_med * elapsed
    if change > th.distance_growth * scale:
        return [
            Hint(
                "info",
                "distance",
                (
                    f"The distance from the initialization grew by {change / scale:.0%} over the "
                    "last "
                    f"{d.size} tracked steps while updates stay non-zero: the optimizer is still "
                    "travelling, moving along the valley walls."
                ),
                "distance_growing",
            )
        ]
    if abs(change) < th.distance_flat * scale and path >= th.diffusion_path * scale:
        return [
            Hint(
                "info",
                "distance",
                (
                    f"The distance from the initialization stayed flat ({change / scale:+.1%}) "
                    "although "
                    f"the updates add up to about {path / scale:.1f}× that distance: the steps "
                    "cancel "
                    "out, the parameters diffuse around a minimum. A smaller learning rate or a "
                    "larger "
                    "batch would settle them."
                ),
                "diffusion",
            )
        ]
    return []


_TEST_LABELS = {"norm_test": "norm", "inner_test": "inner-product", "ortho_test": "orthogonality"}


def _gradient_tests(
    df: pd.DataFrame, hists: pd.DataFrame | None, window: int, th: HintThresholds
) -> list[Hint]:
    refs = {"norm_test": th.norm_test, "inner_test": th.inner_test, "ortho_test": th.ortho_test}
    failing: dict[str, float] = {}
    for test, ref in refs.items():
        _, v = tail_values(df, test, window=window)
        if v.size >= th.min_points and float(np.median(v)) > ref:
            failing[test] = float(np.median(v))
    if not failing:
        return []
    parts = ", ".join(f"{_TEST_LABELS[t]} test {v:.2f} > {refs[t]:.2f}" for t, v in failing.items())
    text = f"Gradient tests above their thresholds ({parts}): noisy gradients, a larger batch"
    text += " helps."
    suggested = [latest_value(df, "batch_size", t) for t in failing]
    suggested = [s for s in suggested if s is not None and math.isfinite(s)]
    if suggested:
        text += f" Suggested batch size ≈ {max(suggested):.0f}"
        current = latest_value(df, "hyperparameters", "batch_size")
        text += f" (currently {current:.0f})." if current is not None else "."
    return [Hint("warning", next(iter(failing)), text, "noisy_gradients")]


def _names(params: list[str], limit: int = 6) -> str:
    shown = ", ".join(params[:limit])
    return shown + (f" and {len(params) - limit} more" if len(params) > limit else "")


def _edge_bins(
    df: pd.DataFrame, hists: pd.DataFrame | None, window: int, th: HintThresholds
) -> list[Hint]:
    latest = latest_hists_by_param(hists, "grad_hist_1d", exclude=())
    flagged = {p: edge_mass(r.counts) for p, r in latest.items()}
    flagged = {p: m for p, m in flagged.items() if math.isfinite(m) and m > th.edge_mass}
    if not flagged:
        return []
    where = "all parameters" if "all" in flagged else "parameters " + _names(list(flagged))
    worst = max(flagged.values())
    return [
        Hint(
            "warning",
            "grad_hist_1d",
            (
                f"The gradient histogram of {where} has up to {worst:.0%} of its mass in the edge "
                "bins "
                "(values beyond the range are clamped there): unnormalized inputs or exploding "
                "gradients."
            ),
            "edge_bins",
        )
    ]


def _vanishing(
    df: pd.DataFrame, hists: pd.DataFrame | None, window: int, th: HintThresholds
) -> list[Hint]:
    instrument = "grad_hist_2d"
    layers: dict[str, HistRecord] = latest_hists_by_param(hists, instrument)
    if not layers:
        instrument = "grad_hist_1d"
        layers = latest_hists_by_param(hists, instrument)
    mass = {p: central_mass(r.counts, r.edges_0) for p, r in layers.items()}
    flagged = [p for p, m in mass.items() if math.isfinite(m) and m >= th.central_mass]
    if not flagged:
        return []
    if len(flagged) == len(layers):
        return [
            Hint(
                "info",
                instrument,
                (
                    f"Every layer has ≥ {th.central_mass:.0%} of its individual gradients in the "
                    "central "
                    "histogram bin(s): gradients are tiny everywhere (vanishing, or training has "
                    "converged)."
                ),
                "vanishing_everywhere",
            )
        ]
    return [
        Hint(
            "warning",
            instrument,
            (
                f"Vanishing gradients in layers {_names(flagged)}: ≥ {th.central_mass:.0%} of "
                "their "
                "individual gradients sit in the central histogram bin(s) while other layers still "
                "get "
                "signal."
            ),
            "vanishing",
        )
    ]


def _thirds(values: np.ndarray) -> tuple[float, float]:
    """Medians of the first and the last third."""
    k = max(1, values.size // 3)
    return float(np.median(values[:k])), float(np.median(values[-k:]))


def _max_ev(
    df: pd.DataFrame, hists: pd.DataFrame | None, window: int, th: HintThresholds
) -> list[Hint]:
    steps, ev = tail_values(df, "hess_max_ev", window=window)
    if ev.size < max(th.min_points, 6):
        return []
    early, late = _thirds(ev)
    if not (early > 0 and late >= th.ev_rise * early):
        return []
    loss_steps, loss = tail_values(df, "loss")
    in_range = (loss_steps >= steps[0]) & (loss_steps <= steps[-1])
    loss_steps, loss = loss_steps[in_range], loss[in_range]
    if loss.size < max(th.min_points, 6):
        return []
    l_early, l_late = _thirds(loss)
    if l_early <= 0 or l_late > th.loss_flat * l_early:
        return []
    return [
        Hint(
            "info",
            "hess_max_ev",
            (
                f"The largest Hessian eigenvalue rose {late / early:.1f}× over the last {ev.size} "
                "tracked steps while the loss has not risen: curvature often moves first. Watch "
                "for a "
                "loss spike; a smaller learning rate keeps the step inside the sharper valley."
            ),
            "max_ev_rising",
        )
    ]


def _early_stopping(
    df: pd.DataFrame, hists: pd.DataFrame | None, window: int, th: HintThresholds
) -> list[Hint]:
    _, eb = tail_values(df, "early_stopping", window=window)
    if eb.size < th.min_points or float(np.median(eb)) <= 0.0:
        return []
    return [
        Hint(
            "info",
            "early_stopping",
            (
                f"The early-stopping criterion is positive (median {float(np.median(eb)):.2f} over "
                "the "
                f"last {eb.size} tracked steps): the gradient is indistinguishable from noise, "
                "training could stop."
            ),
            "early_stopping",
        )
    ]


_RULES: tuple[_Rule, ...] = (
    _alpha,
    _gradient_tests,
    _edge_bins,
    _vanishing,
    _distance,
    _max_ev,
    _early_stopping,
)


def hints(
    df: pd.DataFrame | None,
    window: int = 200,
    hists: pd.DataFrame | None = None,
    thresholds: HintThresholds | None = None,
) -> list[Hint]:
    """Diagnose one run from its log, as a reader of the Cockpit view would.

    Args:
        df: The run's scalars in the log schema (model-wide ``param == "all"`` rows are used).
        window: How many of the latest tracked values each rule looks at.
        hists: The run's histograms in the log schema, for the histogram rules.
        thresholds: Rule thresholds; defaults to :class:`HintThresholds`.

    Returns:
        The hints that fire, warnings first, then in rule order.

    Example:
        A full-batch linear regression trained with a learning rate that is too large:

        >>> import tempfile
        >>> import torch
        >>> from app.hints import hints
        >>> from cockpit import Cockpit
        >>> from cockpit.logreader import read_log
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x = torch.randn(32, 3).double()  # [N, D_in]
        >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]]).double()  # [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.9)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with Cockpit(model, loss_fn, opt, ["alpha", "loss"], logdir=tmp) as cockpit:
        ...         for step in range(7):
        ...             opt.zero_grad()
        ...             loss = loss_fn(model(x), y)
        ...             with cockpit.step(step, loss):
        ...                 loss.backward()
        ...             opt.step()
        ...     df = read_log(tmp)
        >>> [(hint.level, hint.rule) for hint in hints(df)]
        [('warning', 'alpha_high')]
        >>> import textwrap
        >>> print(textwrap.fill(hints(df)[0].text, 80))
        Median α = 1.40 over the last 6 tracked steps: steps overshoot the local minimum
        (α ≈ +1 or above). The learning rate is probably too large.

    """
    th = thresholds or HintThresholds()
    if df is None:
        df = pd.DataFrame(columns=["step", "wall_time", "instrument", "metric", "param", "value"])
    found = [hint for rule in _RULES for hint in rule(df, hists, window, th)]
    return sorted(found, key=lambda h: h.level != "warning")
