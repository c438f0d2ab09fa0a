"""Pure data transforms behind the dashboard: series extraction, smoothing, downsampling, CSV.

Everything here is plain pandas/numpy on the tidy log schema, so it runs (and is tested) without
Dash or a browser.

Scalars are a DataFrame with columns ``step`` (int64), ``wall_time`` (float64, unix seconds),
``instrument``, ``metric``, ``param`` (str) and ``value`` (float64, may be NaN). Histograms are a
DataFrame with columns ``step``, ``wall_time``, ``instrument`` (``"grad_hist_1d"`` or
``"grad_hist_2d"``), ``param``, ``counts`` (array ``[B]`` or ``[B_g, B_p]``: gradient bins ×
parameter bins), ``edges_0`` (``B + 1`` or ``B_g + 1`` gradient-bin edges) and ``edges_1``
(``B_p + 1`` parameter-bin edges, empty for 1D).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from typing import Literal, NamedTuple, TypedDict

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

__all__ = [
    "XAxis",
    "EmaState",
    "HistRecord",
    "debiased_ema",
    "ema_with_state",
    "minmax_indices",
    "downsample_minmax",
    "series",
    "tail_values",
    "latest_value",
    "metrics_of",
    "params_of",
    "natural_key",
    "latest_hist",
    "latest_hists_by_param",
    "hist_history",
    "as_counts",
    "bin_centers",
    "edge_mass",
    "central_mass",
    "csv_of",
]

XAxis = Literal["step", "wall_time"]
_X_AXES = ("step", "wall_time")


class EmaState(TypedDict):
    """JSON-serializable state of a debiased EMA, so smoothing can continue on new points.

    Attributes:
        last: The biased accumulator after the last finite value (TensorBoard's ``last``).
        count: How many finite values have been folded in.

    Example:
        >>> from app.transforms import ema_with_state
        >>> _, state = ema_with_state([1.0, 2.0, float("nan")], smoothing=0.5)
        >>> state  # NaN is skipped: two values folded in
        {'last': 1.25, 'count': 2}

    """

    last: float
    count: int


class HistRecord(NamedTuple):
    """One logged histogram.

    Attributes:
        step: Training step it belongs to.
        counts: ``[B]`` (1D) or ``[B_g, B_p]`` (2D, gradient bins × parameter bins) counts.
        edges_0: Gradient-bin edges, ``B + 1`` or ``B_g + 1`` values.
        edges_1: Parameter-bin edges, ``B_p + 1`` values (empty for 1D).

    Example:
        >>> import numpy as np
        >>> import pandas as pd
        >>> edges = np.linspace(-1.0, 1.0, 5)  # 4 bins
        >>> hists = pd.DataFrame({  # histograms in the log schema
        ...     "step": [0, 0, 1, 1],
        ...     "instrument": ["grad_hist_1d"] * 4,
        ...     "param": ["all", "0.weight", "all", "0.weight"],
        ...     "counts": [np.array([1.0, 2, 2, 1]), np.array([0.0, 1, 1, 0]),
        ...                np.array([0.0, 3, 3, 0]), np.array([0.0, 2, 2, 0])],
        ...     "edges_0": [edges] * 4,
        ...     "edges_1": [np.empty(0)] * 4,
        ... })
        >>> from app.transforms import latest_hist
        >>> rec = latest_hist(hists, "grad_hist_1d", "0.weight")
        >>> rec.step, rec.counts.tolist(), rec.edges_0.tolist(), rec.edges_1.size
        (1, [0.0, 2.0, 2.0, 0.0], [-1.0, -0.5, 0.0, 0.5, 1.0], 0)

    """

    step: int
    counts: np.ndarray
    edges_0: np.ndarray
    edges_1: np.ndarray


# --------------------------------------------------------------------------------------------
# Smoothing
# --------------------------------------------------------------------------------------------
def _check_smoothing(smoothing: float) -> float:
    smoothing = float(smoothing)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    return smoothing


def _powers(w: float, start: int, n: int) -> np.ndarray:
    """``w ** arange(start, start + n)`` for ``0 < w < 1``, equal to it bit for bit.

    ``pow`` is slow once its results become subnormal; beyond the exponent at which
    ``w ** j`` rounds to exactly 0.0 the tail is filled with zeros instead of computed.
    """
    # w**j == 0.0 once j * ln(w) < ln(2**-1075) ≈ -745.13; the margin only costs a few pows.
    last = int(745.2 / -math.log(w)) + 2 if w > 0.0 else start
    out = np.zeros(n, dtype=np.float64)
    m = max(0, min(n, last - start + 1))
    if m:
        out[:m] = w ** np.arange(start, start + m, dtype=np.float64)
    return out


def ema_with_state(
    values: ArrayLike, smoothing: float, state: EmaState | None = None
) -> tuple[np.ndarray, EmaState]:
    """Debiased EMA that can resume from a previous chunk's state.

    TensorBoard's scalar smoothing: ``last = w·last + (1 − w)·v`` over finite values only,
    divided by the debias factor ``1 − w^count``. Non-finite values (NaN gaps, ±inf) are skipped:
    they neither move the average nor count, and stay non-finite in the output, so a plotted line
    keeps its gaps. Smoothing ``a`` then ``b`` (passing ``a``'s state) equals smoothing ``a + b``.

    Vectorized (O(n)): the fresh part is pandas' adjusted EWM (the same weighted mean as the
    debiased recursion), combined in closed form with the carried-over accumulator.

    Args:
        values: The raw values, in x order.
        smoothing: Weight ``w`` of the past, in ``[0, 1)``; 0 returns the values unchanged.
        state: The state returned for the preceding chunk, or ``None`` to start fresh.

    Returns:
        The smoothed values (same length, float64) and the state after the last finite value.

    Raises:
        ValueError: If ``smoothing`` is outside ``[0, 1)``.

    Example:
        Smoothing a series in two chunks gives the same as smoothing it at once:

        >>> import numpy as np
        >>> from app.transforms import debiased_ema, ema_with_state
        >>> y = np.array([1.0, 3.0, np.nan, 2.0, 5.0, 4.0])
        >>> first, state = ema_with_state(y[:3], 0.6)
        >>> rest, _ = ema_with_state(y[3:], 0.6, state)
        >>> np.allclose(np.concatenate([first, rest]), debiased_ema(y, 0.6), equal_nan=True)
        True

    """
    w = _check_smoothing(smoothing)
    y = np.array(values, dtype=np.float64, copy=True).reshape(-1)
    last0 = 0.0 if state is None else float(state["last"])
    count0 = 0 if state is None else int(state["count"])
    finite = np.isfinite(y)
    f = y[finite]
    k = f.size
    if k == 0:
        return y, {"last": last0, "count": count0}
    if w == 0.0:
        return y, {"last": float(f[-1]), "count": count0 + k}
    # m_j = Σ_{i≤j} w^{j−i} f_i / Σ_{i≤j} w^{j−i}: the debiased EMA of the fresh values alone.
    m = pd.Series(f).ewm(alpha=1.0 - w, adjust=True).mean().to_numpy()
    wj = _powers(w, 1, k)
    acc = wj * last0 + (1.0 - wj) * m  # biased accumulator continuing from last0
    debias = 1.0 - _powers(w, count0 + 1, k)
    y[finite] = acc / debias
    return y, {"last": float(acc[-1]), "count": count0 + k}


def debiased_ema(values: ArrayLike, smoothing: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average that skips NaN gaps.

    Args:
        values: The raw values, in x order.
        smoothing: Weight of the past, in ``[0, 1)``; 0 is the identity.

    Returns:
        The smoothed values as float64, NaN wherever the input is not finite.

    Raises:
        ValueError: If ``smoothing`` is outside ``[0, 1)``.

    Example:
        >>> import numpy as np
        >>> from app.transforms import debiased_ema
        >>> debiased_ema([2.0, 2.0, np.nan, 2.0], 0.9).tolist()  # debiased: no pull towards 0
        [2.0, 2.0, nan, 2.0]
        >>> debiased_ema([0.0, 1.0], 0.5).round(4).tolist()  # (0.5·0 + 1) / (1 + 0.5)
        [0.0, 0.6667]

    """
    return ema_with_state(values, smoothing)[0]


# --------------------------------------------------------------------------------------------
# Downsampling
# --------------------------------------------------------------------------------------------
def _first_per_bucket(mask: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return idx
    b = bucket[idx]
    keep = np.empty(idx.size, dtype=bool)
    keep[0] = True
    np.not_equal(b[1:], b[:-1], out=keep[1:])
    return idx[keep]


def minmax_indices(y: ArrayLike, max_points: int) -> np.ndarray:
    """Indices that a min/max-preserving downsampling keeps, in increasing order.

    The series is cut into ``(max_points − 2) // 2`` buckets of consecutive points; each bucket
    keeps the (first) position of its minimum and of its maximum, and the very first and last
    points are always kept. So the global minimum and maximum, every spike and the x range
    survive. Non-finite values are never picked as extremes; a bucket with no finite value keeps
    its first point, so NaN gaps still break the drawn line. O(n), vectorized.

    Args:
        y: The values, in x order.
        max_points: Upper bound on the number of indices returned (at least 4).

    Returns:
        Sorted unique int64 indices; ``arange(n)`` when ``n <= max_points``.

    Raises:
        ValueError: If ``max_points < 4``.

    Example:
        >>> import numpy as np
        >>> from app.transforms import minmax_indices
        >>> y = np.zeros(1000)
        >>> y[[137, 700]] = [5.0, -3.0]  # two spikes
        >>> idx = minmax_indices(y, max_points=10)
        >>> len(idx) <= 10, {0, 137, 700, 999} <= set(idx.tolist())
        (True, True)

    """
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, got {max_points}")
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    n = y.size
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    n_buckets = (max_points - 2) // 2
    starts = (np.arange(n_buckets, dtype=np.int64) * n) // n_buckets
    sizes = np.diff(np.append(starts, n))
    bucket = np.repeat(np.arange(n_buckets), sizes)
    finite = np.isfinite(y)
    lows = np.minimum.reduceat(np.where(finite, y, np.inf), starts)
    highs = np.maximum.reduceat(np.where(finite, y, -np.inf), starts)
    is_min = finite & (y == lows[bucket])
    is_max = finite & (y == highs[bucket])
    no_finite = ~np.logical_or.reduceat(finite, starts)
    parts = (
        np.array([0, n - 1], dtype=np.int64),
        _first_per_bucket(is_min, bucket),
        _first_per_bucket(is_max, bucket),
        starts[no_finite],
    )
    return np.unique(np.concatenate(parts))


def downsample_minmax(x: ArrayLike, y: ArrayLike, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Min/max-preserving bucket downsampling of an x-sorted series (see :func:`minmax_indices`).

    Args:
        x: The x values, sorted ascending.
        y: The y values, same length as ``x``.
        max_points: Upper bound on the number of points returned (at least 4).

    Returns:
        The kept ``(x, y)``, in x order; an exact copy when the series is short enough.

    Raises:
        ValueError: If the lengths differ or ``max_points < 4``.

    Example:
        >>> import numpy as np
        >>> from app.transforms import downsample_minmax
        >>> x = np.arange(10_000)
        >>> y = np.sin(x / 500.0)
        >>> xs, ys = downsample_minmax(x, y, max_points=100)
        >>> len(xs) <= 100, bool(ys.max() == y.max()), bool(ys.min() == y.min())
        (True, True, True)
        >>> int(xs[0]), int(xs[-1])  # the x range survives
        (0, 9999)

    """
    x = np.asarray(x).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"x and y differ in length: {x.size} != {y.size}")
    idx = minmax_indices(y, max_points)
    return x[idx].copy(), y[idx].copy()


# --------------------------------------------------------------------------------------------
# Series extraction
# --------------------------------------------------------------------------------------------
def _check_x(x: str) -> None:
    if x not in _X_AXES:
        raise ValueError(f"x must be one of {_X_AXES}, got {x!r}")


def series(
    df: pd.DataFrame | None,
    instrument: str,
    metric: str | None = None,
    param: str = "all",
    x: XAxis = "step",
) -> tuple[np.ndarray, np.ndarray]:
    """Extract one sorted ``(x, y)`` series from a scalars DataFrame.

    A step logged twice (e.g. read twice) keeps its last row. NaN values are kept (gaps).

    Args:
        df: Scalars in the log schema (``None`` or empty gives empty arrays).
        instrument: Instrument name.
        metric: Metric name; defaults to ``instrument`` (the main value).
        param: Parameter name, ``"all"`` for model-wide values, ``"groupK"`` for param groups.
        x: ``"step"`` or ``"wall_time"`` (unix seconds).

    Returns:
        ``(x, y)`` float64 arrays sorted by ``x``.

    Raises:
        ValueError: If ``x`` is not ``"step"`` or ``"wall_time"``.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({  # scalars in the log schema
        ...     "step": [0, 1, 2, 3, 0, 1],
        ...     "wall_time": [10.0, 11.0, 12.0, 13.0, 10.0, 11.0],
        ...     "instrument": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "metric": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "param": ["all"] * 4 + ["group10", "group2"],
        ...     "value": [1.0, 0.5, float("nan"), 0.25, 3.0, 4.0],
        ... })
        >>> from app.transforms import series
        >>> steps, values = series(df, "loss")  # metric defaults to the instrument, param "all"
        >>> steps.tolist(), values.tolist()  # NaN kept: the plotted line gets a gap
        ([0.0, 1.0, 2.0, 3.0], [1.0, 0.5, nan, 0.25])
        >>> series(df, "grad_norm", param="group2")[1].tolist()
        [4.0]

    """
    _check_x(x)
    empty = (np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64))
    if df is None or df.empty:
        return empty
    metric = instrument if metric is None else metric
    # numpy on the columns (integer codes of categoricals): a tenth of pandas' masking,
    # sort_values and drop_duplicates on a 10⁵-row series.
    mask = _matches(df["instrument"], instrument)
    if not mask.any():
        return empty
    mask &= _matches(df["metric"], metric)
    mask &= _matches(df["param"], param)
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        return empty
    steps = df["step"].to_numpy()[rows]
    order = np.argsort(steps, kind="stable")
    rows, steps = rows[order], steps[order]
    last = np.ones(rows.size, dtype=bool)  # a repeated step keeps its last row
    last[:-1] = steps[1:] != steps[:-1]
    rows, xs = rows[last], steps[last]
    if x == "wall_time":
        wall = df["wall_time"].to_numpy()[rows]
        order = np.argsort(wall, kind="stable")
        rows, xs = rows[order], wall[order]
    return xs.astype(np.float64), df["value"].to_numpy()[rows].astype(np.float64)


def _matches(column: pd.Series, value: str) -> np.ndarray:
    """``column == value`` as a boolean array (comparing integer codes for categoricals)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        categories = column.cat.categories
        if value not in categories:
            return np.zeros(len(column), dtype=bool)
        return column.cat.codes.to_numpy() == categories.get_loc(value)
    return np.asarray(column.to_numpy() == value, dtype=bool)


def tail_values(
    df: pd.DataFrame | None,
    instrument: str,
    metric: str | None = None,
    param: str = "all",
    window: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The last ``window`` finite values of a series, by step.

    Args:
        df: Scalars in the log schema.
        instrument: Instrument name.
        metric: Metric name; defaults to ``instrument``.
        param: Parameter name.
        window: How many tracked (finite) values to keep from the end; ``None`` keeps all.

    Returns:
        ``(steps, values)`` float64 arrays, sorted by step, finite values only.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({  # scalars in the log schema
        ...     "step": [0, 1, 2, 3, 0, 1],
        ...     "wall_time": [10.0, 11.0, 12.0, 13.0, 10.0, 11.0],
        ...     "instrument": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "metric": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "param": ["all"] * 4 + ["group10", "group2"],
        ...     "value": [1.0, 0.5, float("nan"), 0.25, 3.0, 4.0],
        ... })
        >>> from app.transforms import tail_values
        >>> steps, values = tail_values(df, "loss", window=2)  # finite values only
        >>> steps.tolist(), values.tolist()
        ([1.0, 3.0], [0.5, 0.25])

    """
    steps, values = series(df, instrument, metric, param, "step")
    finite = np.isfinite(values)
    steps, values = steps[finite], values[finite]
    if window is not None:
        steps, values = steps[-window:], values[-window:]
    return steps, values


def latest_value(
    df: pd.DataFrame | None, instrument: str, metric: str | None = None, param: str = "all"
) -> float | None:
    """The value at the latest step with a finite value, or ``None``.

    Args:
        df: Scalars in the log schema.
        instrument: Instrument name.
        metric: Metric name; defaults to ``instrument``.
        param: Parameter name.

    Returns:
        The latest finite value, or ``None`` when there is none.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({  # scalars in the log schema
        ...     "step": [0, 1, 2, 3, 0, 1],
        ...     "wall_time": [10.0, 11.0, 12.0, 13.0, 10.0, 11.0],
        ...     "instrument": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "metric": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "param": ["all"] * 4 + ["group10", "group2"],
        ...     "value": [1.0, 0.5, float("nan"), 0.25, 3.0, 4.0],
        ... })
        >>> from app.transforms import latest_value
        >>> latest_value(df, "loss"), latest_value(df, "alpha")
        (0.25, None)

    """
    _, values = tail_values(df, instrument, metric, param, window=1)
    return float(values[-1]) if values.size else None


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically (``group2`` before ``group10``).

    Args:
        name: The string to sort.

    Returns:
        A tuple usable as a sort key.

    Example:
        >>> from app.transforms import natural_key
        >>> sorted(["group10", "group2", "layers.10.weight", "layers.9.weight"], key=natural_key)
        ['group2', 'group10', 'layers.9.weight', 'layers.10.weight']

    """
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", name)
        if part
    )


def metrics_of(df: pd.DataFrame | None, instrument: str) -> list[str]:
    """Metric names logged for an instrument, in natural order.

    Args:
        df: Scalars in the log schema.
        instrument: Instrument name.

    Returns:
        The distinct metric names.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({  # scalars in the log schema
        ...     "step": [0, 1, 2, 3, 0, 1],
        ...     "wall_time": [10.0, 11.0, 12.0, 13.0, 10.0, 11.0],
        ...     "instrument": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "metric": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "param": ["all"] * 4 + ["group10", "group2"],
        ...     "value": [1.0, 0.5, float("nan"), 0.25, 3.0, 4.0],
        ... })
        >>> from app.transforms import metrics_of
        >>> metrics_of(df, "loss"), metrics_of(None, "loss")
        (['loss'], [])

    """
    if df is None or df.empty:
        return []
    names = df.loc[df["instrument"] == instrument, "metric"].unique()
    return sorted((str(n) for n in names), key=natural_key)


def params_of(df: pd.DataFrame | None, instrument: str, metric: str | None = None) -> list[str]:
    """Parameter names logged for an instrument/metric, in natural order.

    Args:
        df: Scalars in the log schema.
        instrument: Instrument name.
        metric: Metric name; defaults to ``instrument``.

    Returns:
        The distinct parameter names.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({  # scalars in the log schema
        ...     "step": [0, 1, 2, 3, 0, 1],
        ...     "wall_time": [10.0, 11.0, 12.0, 13.0, 10.0, 11.0],
        ...     "instrument": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "metric": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "param": ["all"] * 4 + ["group10", "group2"],
        ...     "value": [1.0, 0.5, float("nan"), 0.25, 3.0, 4.0],
        ... })
        >>> from app.transforms import params_of
        >>> params_of(df, "grad_norm")  # natural order
        ['group2', 'group10']

    """
    if df is None or df.empty:
        return []
    metric = instrument if metric is None else metric
    mask = (df["instrument"] == instrument) & (df["metric"] == metric)
    return sorted((str(p) for p in df.loc[mask, "param"].unique()), key=natural_key)


# --------------------------------------------------------------------------------------------
# Histograms
# --------------------------------------------------------------------------------------------
def as_counts(obj: object) -> np.ndarray:
    """Coerce a stored ``counts`` cell to a float64 array (1D, or 2D from nested arrays).

    Parquet round trips may turn a 2D array into an object array of 1D rows; this stacks them.

    Args:
        obj: The cell value (ndarray, nested list, or object array of rows).

    Returns:
        A float64 ndarray.

    Example:
        >>> import numpy as np
        >>> from app.transforms import as_counts
        >>> rows = np.empty(2, dtype=object)  # how Parquet may return a 2D histogram
        >>> rows[0], rows[1] = [1, 2, 3], [4, 5, 6]
        >>> as_counts(rows).shape, as_counts(rows).dtype
        ((2, 3), dtype('float64'))

    """
    arr = np.asarray(obj)
    if arr.dtype == object:
        arr = np.stack([np.asarray(row, dtype=np.float64) for row in arr])
    return arr.astype(np.float64, copy=False)


def _edges(obj: object) -> np.ndarray:
    if obj is None:
        return np.empty(0, dtype=np.float64)
    return np.asarray(obj, dtype=np.float64).reshape(-1)


def _hist_rows(hists: pd.DataFrame | None, instrument: str, param: str | None) -> pd.DataFrame:
    if hists is None or hists.empty:
        return pd.DataFrame(columns=["step", "param", "counts", "edges_0", "edges_1"])
    mask = hists["instrument"] == instrument
    if param is not None:
        mask &= hists["param"] == param
    return hists.loc[mask].sort_values("step", kind="stable")


def _record(row: pd.Series) -> HistRecord:
    return HistRecord(
        int(row["step"]),
        as_counts(row["counts"]),
        _edges(row["edges_0"]),
        _edges(row.get("edges_1")),
    )


def latest_hist(
    hists: pd.DataFrame | None, instrument: str, param: str = "all"
) -> HistRecord | None:
    """The histogram at the latest step for one instrument and parameter.

    Args:
        hists: Histograms in the log schema.
        instrument: ``"grad_hist_1d"`` or ``"grad_hist_2d"``.
        param: Parameter name, ``"all"`` for the whole model.

    Returns:
        The latest record, or ``None`` if there is none.

    Example:
        >>> import numpy as np
        >>> import pandas as pd
        >>> edges = np.linspace(-1.0, 1.0, 5)  # 4 bins
        >>> hists = pd.DataFrame({  # histograms in the log schema
        ...     "step": [0, 0, 1, 1],
        ...     "instrument": ["grad_hist_1d"] * 4,
        ...     "param": ["all", "0.weight", "all", "0.weight"],
        ...     "counts": [np.array([1.0, 2, 2, 1]), np.array([0.0, 1, 1, 0]),
        ...                np.array([0.0, 3, 3, 0]), np.array([0.0, 2, 2, 0])],
        ...     "edges_0": [edges] * 4,
        ...     "edges_1": [np.empty(0)] * 4,
        ... })
        >>> from app.transforms import latest_hist
        >>> rec = latest_hist(hists, "grad_hist_1d")  # param "all"
        >>> rec.step, rec.counts.tolist()
        (1, [0.0, 3.0, 3.0, 0.0])
        >>> latest_hist(hists, "grad_hist_2d") is None
        True

    """
    rows = _hist_rows(hists, instrument, param)
    return None if rows.empty else _record(rows.iloc[-1])


def latest_hists_by_param(
    hists: pd.DataFrame | None, instrument: str, exclude: tuple[str, ...] = ("all",)
) -> dict[str, HistRecord]:
    """The latest histogram of every parameter, in order of first appearance in the log.

    Args:
        hists: Histograms in the log schema.
        instrument: ``"grad_hist_1d"`` or ``"grad_hist_2d"``.
        exclude: Parameter names to leave out (the model-wide ``"all"`` by default).

    Returns:
        ``{param: HistRecord}``, ordered like the model's parameters were logged.

    Example:
        >>> import numpy as np
        >>> import pandas as pd
        >>> edges = np.linspace(-1.0, 1.0, 5)  # 4 bins
        >>> hists = pd.DataFrame({  # histograms in the log schema
        ...     "step": [0, 0, 1, 1],
        ...     "instrument": ["grad_hist_1d"] * 4,
        ...     "param": ["all", "0.weight", "all", "0.weight"],
        ...     "counts": [np.array([1.0, 2, 2, 1]), np.array([0.0, 1, 1, 0]),
        ...                np.array([0.0, 3, 3, 0]), np.array([0.0, 2, 2, 0])],
        ...     "edges_0": [edges] * 4,
        ...     "edges_1": [np.empty(0)] * 4,
        ... })
        >>> from app.transforms import latest_hists_by_param
        >>> by_param = latest_hists_by_param(hists, "grad_hist_1d")  # "all" left out
        >>> list(by_param), by_param["0.weight"].step
        (['0.weight'], 1)

    """
    rows = _hist_rows(hists, instrument, None)
    if rows.empty:
        return {}
    order = list(dict.fromkeys(hists.loc[hists["instrument"] == instrument, "param"]))
    last = rows.drop_duplicates("param", keep="last").set_index("param")
    return {str(p): _record(last.loc[p]) for p in order if p not in exclude}


def hist_history(
    hists: pd.DataFrame | None, instrument: str = "grad_hist_1d", param: str = "all"
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """All histograms of one parameter over time, for the step × bin heatmap.

    Rows whose counts shape differs from the latest histogram's are dropped (the binning was
    changed mid-run); a step logged twice keeps its last row.

    Args:
        hists: Histograms in the log schema.
        instrument: Usually ``"grad_hist_1d"``.
        param: Parameter name.

    Returns:
        ``(steps, counts_list, edges)`` with the latest histogram's gradient-bin edges.

    Example:
        >>> import numpy as np
        >>> import pandas as pd
        >>> edges = np.linspace(-1.0, 1.0, 5)  # 4 bins
        >>> hists = pd.DataFrame({  # histograms in the log schema
        ...     "step": [0, 0, 1, 1],
        ...     "instrument": ["grad_hist_1d"] * 4,
        ...     "param": ["all", "0.weight", "all", "0.weight"],
        ...     "counts": [np.array([1.0, 2, 2, 1]), np.array([0.0, 1, 1, 0]),
        ...                np.array([0.0, 3, 3, 0]), np.array([0.0, 2, 2, 0])],
        ...     "edges_0": [edges] * 4,
        ...     "edges_1": [np.empty(0)] * 4,
        ... })
        >>> from app.transforms import hist_history
        >>> steps, counts, edges = hist_history(hists, "grad_hist_1d", "all")
        >>> steps.tolist(), np.stack(counts).shape, edges.tolist()  # [T, B] for the heatmap
        ([0, 1], (2, 4), [-1.0, -0.5, 0.0, 0.5, 1.0])

    """
    rows = _hist_rows(hists, instrument, param)
    if rows.empty:
        return np.empty(0, dtype=np.int64), [], np.empty(0, dtype=np.float64)
    rows = rows.drop_duplicates("step", keep="last")
    counts = [as_counts(c) for c in rows["counts"]]
    shape = counts[-1].shape
    keep = [c.shape == shape for c in counts]
    steps = rows["step"].to_numpy(dtype=np.int64)[keep]
    return (
        steps,
        [c for c, k in zip(counts, keep, strict=True) if k],
        _edges(rows["edges_0"].iloc[-1]),
    )


def bin_centers(edges: ArrayLike) -> np.ndarray:
    """Midpoints of consecutive bin edges.

    Args:
        edges: ``B + 1`` increasing edges.

    Returns:
        ``B`` centres.

    Example:
        >>> from app.transforms import bin_centers
        >>> bin_centers([-1.0, -0.5, 0.0, 0.5, 1.0]).tolist()
        [-0.75, -0.25, 0.25, 0.75]

    """
    e = np.asarray(edges, dtype=np.float64)
    return 0.5 * (e[1:] + e[:-1])


def _gradient_marginal(counts: ArrayLike) -> np.ndarray:
    c = as_counts(counts)
    return c.sum(axis=1) if c.ndim == 2 else c.reshape(-1)


def edge_mass(counts: ArrayLike) -> float:
    """Fraction of gradient mass in the two outermost gradient bins.

    Values outside the histogram range are clamped into these bins, so a large fraction means
    gradients beyond the range (unnormalized inputs or exploding gradients).

    Args:
        counts: ``[B]`` or ``[B_g, B_p]`` counts (gradient axis first).

    Returns:
        The fraction in ``[0, 1]``, NaN for an empty histogram.

    Example:
        >>> from app.transforms import edge_mass
        >>> edge_mass([40, 5, 5, 50])  # most gradients beyond the range: unnormalized inputs?
        0.9
        >>> edge_mass([[1, 1], [3, 3], [1, 1]])  # 2D: gradient bins × parameter bins
        0.4

    """
    g = _gradient_marginal(counts)
    total = g.sum()
    if g.size == 0 or total <= 0:
        return float("nan")
    return float((g[0] + g[-1]) / total) if g.size > 1 else 1.0


def central_mass(counts: ArrayLike, edges: ArrayLike) -> float:
    """Fraction of gradient mass in the central bin(s), where vanishing gradients pile up.

    The central bins are the bin containing 0, or both bins touching 0 when 0 is an edge (the
    default ranges are symmetric, so 0 is an edge).

    Args:
        counts: ``[B]`` or ``[B_g, B_p]`` counts (gradient axis first).
        edges: The ``B + 1`` (or ``B_g + 1``) gradient-bin edges.

    Returns:
        The fraction in ``[0, 1]``; NaN for an empty histogram or when 0 lies outside the range.

    Example:
        >>> from app.transforms import central_mass
        >>> edges = [-1.0, -0.5, 0.0, 0.5, 1.0]  # 0 is an edge: the two bins touching it
        >>> central_mass([1, 44, 50, 5], edges)  # piled up at zero: vanishing gradients?
        0.94

    """
    g = _gradient_marginal(counts)
    e = _edges(edges)
    total = g.sum()
    if g.size == 0 or total <= 0 or e.size != g.size + 1 or not e[0] <= 0.0 <= e[-1]:
        return float("nan")
    scale = max(abs(e[0]), abs(e[-1]))
    on_edge = np.flatnonzero(np.isclose(e, 0.0, rtol=0.0, atol=1e-9 * scale))
    if on_edge.size:
        j = int(on_edge[0])
        central = g[max(j - 1, 0) : j + 1].sum()
    else:
        central = g[int(np.searchsorted(e, 0.0, side="right")) - 1]
    return float(central / total)


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------
def csv_of(
    runs: Mapping[str, pd.DataFrame] | pd.DataFrame,
    instrument: str,
    metric: str | None = None,
    param: str = "all",
    x: XAxis = "step",
    smoothing: float = 0.0,
) -> str:
    """CSV text of one series for every run (what a line panel shows, before downsampling).

    Args:
        runs: ``{run name: scalars}``, or one scalars DataFrame (named ``"run"``).
        instrument: Instrument name.
        metric: Metric name; defaults to ``instrument``.
        param: Parameter name.
        x: ``"step"`` or ``"wall_time"``.
        smoothing: EMA smoothing for the ``smoothed`` column.

    Returns:
        CSV with header ``run,<x>,value,smoothed`` and one line per point.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({  # scalars in the log schema
        ...     "step": [0, 1, 2, 3, 0, 1],
        ...     "wall_time": [10.0, 11.0, 12.0, 13.0, 10.0, 11.0],
        ...     "instrument": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "metric": ["loss"] * 4 + ["grad_norm"] * 2,
        ...     "param": ["all"] * 4 + ["group10", "group2"],
        ...     "value": [1.0, 0.5, float("nan"), 0.25, 3.0, 4.0],
        ... })
        >>> from app.transforms import csv_of
        >>> print(csv_of({"sgd": df}, "loss", smoothing=0.5), end="")
        run,step,value,smoothed
        sgd,0,1.0,1.0
        sgd,1,0.5,0.6666666666666666
        sgd,2,,
        sgd,3,0.25,0.42857142857142855

    """
    if isinstance(runs, pd.DataFrame):
        runs = {"run": runs}
    frames = []
    for name, df in runs.items():
        xs, ys = series(df, instrument, metric, param, x)
        frames.append(
            pd.DataFrame({"run": name, x: xs, "value": ys, "smoothed": debiased_ema(ys, smoothing)})
        )
    table = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["run", x, "value", "smoothed"])
    )
    if x == "step" and not table.empty:
        table[x] = table[x].astype(np.int64)
    buf = io.StringIO()
    table.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()
