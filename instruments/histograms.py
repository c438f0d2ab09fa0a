"""Reference histograms of individual-gradient entries (Cockpit's GradHist1d/2d).

These functions define what "the same histogram" means for the engine, which bins
layer by layer in chunks: for ``bins`` equal-width bins on ``[lo, hi]``

- the edges are ``lo + k · ((hi − lo) / bins)`` for ``k = 0 … bins − 1`` and exactly
  ``hi`` for ``k = bins``, in float64 (the edges of ``numpy.linspace`` and hence of
  ``numpy.histogram`` / ``numpy.histogram2d``);
- a value ``v`` is first clamped into ``[lo, hi]`` (so outliers, ±inf included,
  land in the edge bins) and then counted in bin ``k`` with
  ``edge_k ≤ v < edge_{k+1}``; the last bin also holds ``v = hi``
  (right edge inclusive);
- NaN entries are not counted (with a warning).

Counts are float64 tensors (exact integers up to 2⁵³), so partial histograms add up
exactly. For the 2D histogram, ``counts[i, j]`` counts pairs with ``x`` in bin ``i``
and ``y`` in bin ``j`` (Cockpit: x = individual-gradient entry, y = parameter value).

Agreement with Cockpit v1.0.2 (``cockpit/quantities/grad_hist.py``,
``utils_hists.py``):

- 1D: Cockpit clamps the (N-rescaled) individual gradients to ``[lo, hi]`` with
  ``torch.clamp`` and counts with ``torch.histc(bins, min=lo, max=hi)``, whose last
  bin includes ``hi``; its edges are ``torch.linspace(lo, hi, bins + 1)``. Same
  definition.
- 2D: Cockpit clamps to ``[lo + w/2, hi − w/2]`` (the centres of the edge bins, ``w``
  the bin width) and indexes with ``((v − lo) / w).long()``. Clamping to the centres
  or to the edges puts the same values in the same bins, so this is the same
  definition (the centre clamp is how Cockpit keeps ``v = hi`` in the last bin).
- Cockpit computes bin indices arithmetically in the gradients' dtype (mostly
  float32), without checking them against the edges; a value within rounding distance
  of an interior edge can land in the neighbouring bin there. Here indices are
  computed in float64 and corrected against the edges as numpy does, so counts match
  ``numpy.histogram`` exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from cockpit.quantities import Hist1D, Hist2D
from instruments._numerics import flat64
from instruments.base import (
    Histogram,
    Instrument,
    PanelSpec,
    Record,
    StepContext,
    register_instrument,
)

__all__ = ["GradHist1D", "GradHist2D", "bin_edges", "bin_indices", "hist_1d", "hist_2d"]


def bin_edges(bins: int, range: tuple[float, float], device: torch.device | None = None) -> Tensor:
    """Return the ``bins + 1`` float64 edges of equal-width bins on ``range``.

    Computed like ``numpy.linspace(lo, hi, bins + 1)``: ``lo + k · step`` with the
    last edge set to ``hi``.

    Args:
        bins: Number of bins (positive).
        range: ``(lo, hi)`` with ``lo < hi``, both finite.
        device: Device of the returned tensor.

    Returns:
        Float64 tensor of shape ``[bins + 1]``.

    Raises:
        ValueError: For a non-positive number of bins or an invalid range.

    Example:
        >>> import numpy as np
        >>> from instruments.histograms import bin_edges
        >>> bin_edges(4, (-1.0, 1.0)).tolist()
        [-1.0, -0.5, 0.0, 0.5, 1.0]
        >>> bool((bin_edges(7, (-0.3, 0.9)).numpy() == np.linspace(-0.3, 0.9, 8)).all())
        True

    """
    if isinstance(bins, bool) or int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    lo, hi = float(range[0]), float(range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"range must be finite with lo < hi, got {range!r}")
    step = (hi - lo) / bins
    edges = torch.arange(bins + 1, dtype=torch.float64, device=device) * step + lo
    edges[-1] = hi
    return edges


def bin_indices(values: Tensor, edges: Tensor) -> Tensor:
    """Bin index of each value, after clamping it into ``[edges[0], edges[-1]]``.

    Args:
        values: Float64 tensor (any shape) without NaN.
        edges: Output of :func:`bin_edges`.

    Returns:
        Int64 tensor like ``values`` with entries in ``[0, len(edges) − 2]``:
        ``k`` with ``edges[k] ≤ v < edges[k+1]``, the last bin right-inclusive.

    Example:
        >>> import torch
        >>> from instruments.histograms import bin_edges, bin_indices
        >>> edges = bin_edges(4, (-1.0, 1.0))  # [-1, -0.5, 0, 0.5, 1]
        >>> v = torch.tensor([-7.0, -0.5, 0.0, 0.49, 1.0, 3.0], dtype=torch.float64)
        >>> bin_indices(v, edges).tolist()  # clamped; the last bin includes 1.0
        [0, 1, 2, 2, 3, 3]

    """
    bins = edges.numel() - 1
    lo, hi = float(edges[0]), float(edges[-1])
    v = values.clamp(lo, hi)
    # Linear estimate (as numpy), then one correction step against the edges.
    idx = ((v - lo) / (hi - lo) * bins).to(torch.int64).clamp_(0, bins - 1)
    idx = idx - (v < edges[idx]).to(torch.int64)
    idx = idx + ((v >= edges[idx + 1]) & (idx != bins - 1)).to(torch.int64)
    return idx


def hist_1d(
    values: Tensor | Sequence[Tensor],
    bins: int = 100,
    range: tuple[float, float] = (-2.0, 2.0),
) -> tuple[Tensor, Tensor]:
    """Histogram of all entries, outliers clamped into the edge bins.

    Args:
        values: Tensor of any shape (e.g. individual gradients ``[N, *]``), or a
            list of such tensors whose entries are all counted together.
        bins: Number of equal-width bins (Cockpit's default 100).
        range: ``(lo, hi)`` of the bins (Cockpit's default ``(−2, 2)``).

    Returns:
        ``(counts, edges)``: float64 tensors of shapes ``[bins]`` and ``[bins + 1]``.

    Example:
        >>> import numpy as np
        >>> import torch
        >>> from instruments.histograms import hist_1d
        >>> _ = torch.manual_seed(0)
        >>> g = torch.randn(8, 3, 4)  # e.g. individual gradients [N, *P]
        >>> counts, edges = hist_1d(g, bins=10, range=(-1.0, 1.0))  # [10], [11]
        >>> ref, _ = np.histogram(g.clamp(-1, 1).numpy(), bins=10, range=(-1.0, 1.0))
        >>> counts.tolist() == ref.tolist(), int(counts.sum())  # every entry counted
        (True, 96)

    """
    v = flat64(values)
    edges = bin_edges(bins, range, device=v.device)
    nan = torch.isnan(v)
    if bool(nan.any()):
        warnings.warn(
            f"{int(nan.sum())} NaN entries are not counted in the histogram.",
            RuntimeWarning,
            stacklevel=2,
        )
        v = v[~nan]
    idx = bin_indices(v, edges)
    counts = torch.bincount(idx, minlength=bins).to(torch.float64)
    return counts, edges


def hist_2d(
    x: Tensor,
    y: Tensor,
    bins: tuple[int, int] = (40, 50),
    range: tuple[tuple[float, float], tuple[float, float]] = (
        (-1.0, 1.0),
        (-2.0, 2.0),
    ),
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Joint histogram of pairs ``(x, y)``, outliers clamped into the edge bins.

    Args:
        x: First coordinate, e.g. individual gradients of one tensor ``[N, *]``.
        y: Second coordinate, broadcastable against ``x``, e.g. the parameter
            tensor ``[*]`` (it is paired with every sample's gradient).
        bins: Number of bins along x and y (Cockpit's default ``(40, 50)``).
        range: ``((x_lo, x_hi), (y_lo, y_hi))`` (Cockpit's ``((−1, 1), (−2, 2))``).

    Returns:
        ``(counts, (x_edges, y_edges))`` with float64 ``counts`` of shape
        ``[bins[0], bins[1]]``; a pair with a NaN coordinate is not counted.

    Example:
        >>> import numpy as np
        >>> import torch
        >>> from instruments.histograms import hist_2d
        >>> _ = torch.manual_seed(0)
        >>> g, theta = torch.randn(8, 3, 4) / 2, torch.randn(3, 4)  # [N, *P], [*P]
        >>> counts, (g_edges, t_edges) = hist_2d(g, theta, bins=(5, 6))  # counts [5, 6]
        >>> gx, ty = torch.broadcast_tensors(g.clamp(-1, 1), theta.clamp(-2, 2))
        >>> ref, _, _ = np.histogram2d(
        ...     gx.flatten().numpy(), ty.flatten().numpy(), bins=(5, 6), range=((-1, 1), (-2, 2))
        ... )
        >>> counts.shape, counts.tolist() == ref.tolist()
        (torch.Size([5, 6]), True)

    """
    xb, yb = torch.broadcast_tensors(x.detach(), y.detach().to(x.device))
    xv = xb.reshape(-1).to(torch.float64)
    yv = yb.reshape(-1).to(torch.float64)
    x_edges = bin_edges(bins[0], range[0], device=xv.device)
    y_edges = bin_edges(bins[1], range[1], device=xv.device)
    nan = torch.isnan(xv) | torch.isnan(yv)
    if bool(nan.any()):
        warnings.warn(
            f"{int(nan.sum())} pairs with NaN are not counted in the histogram.",
            RuntimeWarning,
            stacklevel=2,
        )
        xv, yv = xv[~nan], yv[~nan]
    flat = bin_indices(xv, x_edges) * bins[1] + bin_indices(yv, y_edges)
    counts = torch.bincount(flat, minlength=bins[0] * bins[1]).to(torch.float64)
    return counts.reshape(bins[0], bins[1]), (x_edges, y_edges)


@register_instrument
class GradHist1D(Instrument):
    """Histogram of all N·D individual-gradient entries, model-wide and per tensor.

    Args:
        schedule: Step predicate (histograms are the costliest first-order quantity on
            CPU; thin their schedule separately if needed).
        bins: Number of bins (default 100).
        range: Bin range; values outside are clamped into the edge bins.

    Example:
        Histograms go to the log (not to :meth:`~cockpit.Cockpit.latest`):

        >>> import tempfile
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from cockpit.logreader import read_histograms
        >>> from instruments.histograms import GradHist1D, hist_1d
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with Cockpit(model, loss_fn, opt, [GradHist1D(bins=8)], logdir=tmp) as cockpit:
        ...         loss = loss_fn(model(x), y)
        ...         with cockpit.step(0, loss):
        ...             loss.backward()
        ...     hists = read_histograms(tmp, instrument="grad_hist_1d")
        >>> hists.param.tolist()
        ['all', 'weight', 'bias']
        >>> g = 2 * (model(x) - y).detach() * torch.cat([x, x.new_ones(32, 1)], 1)  # [N, D]: g_n
        >>> hists.counts[0].tolist() == hist_1d(g, bins=8)[0].tolist()
        True
    """

    name = "grad_hist_1d"
    cost = "first-order"
    panel = PanelSpec(
        "hist1d",
        "gradients",
        "Gradient histogram",
        description="Where do the individual gradient entries lie? Edge-bin mass: exploding.",
    )

    def __init__(self, schedule=None, bins: int = 100, range: tuple[float, float] = (-2.0, 2.0)):
        super().__init__(schedule)
        self.quantity = Hist1D(bins=bins, range=tuple(range))
        self.requires = frozenset({self.quantity})

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        assert ctx.gathered is not None
        counts = ctx.gathered[self.quantity]
        edges = (self.quantity.edges(),)
        rows: list[Record] = [
            Histogram(ctx.step, self.name, "all", ctx.gathered.total(self.quantity), edges)
        ]
        rows += [Histogram(ctx.step, self.name, k, c, edges) for k, c in counts.items()]
        return rows

    def config(self) -> dict:  # noqa: D102
        return {**super().config(), "bins": self.quantity.bins, "range": list(self.quantity.range)}


@register_instrument
class GradHist2D(Instrument):
    """Joint histogram of (individual gradient entry, parameter value), model-wide and per tensor.

    The per-tensor histograms are the layer-wise view that reveals vanishing gradients.

    Args:
        schedule: Step predicate.
        bins: ``(gradient bins, parameter bins)``, default (40, 50).
        range: ``((g_low, g_high), (θ_low, θ_high))``, default ((−1, 1), (−2, 2)).

    Example:
        >>> import tempfile
        >>> import torch
        >>> from cockpit import Cockpit
        >>> from cockpit.logreader import read_histograms
        >>> from instruments.histograms import GradHist2D, hist_2d
        >>> _ = torch.manual_seed(0)
        >>> model, loss_fn = torch.nn.Linear(3, 1).double(), torch.nn.MSELoss()
        >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 1).double()  # [N, D_in], [N, 1]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> inst = GradHist2D(bins=(6, 4))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with Cockpit(model, loss_fn, opt, [inst], logdir=tmp) as cockpit:
        ...         loss = loss_fn(model(x), y)
        ...         with cockpit.step(0, loss):
        ...             loss.backward()
        ...     hists = read_histograms(tmp, instrument="grad_hist_2d", param="weight")
        >>> tuple(hists["shape"][0])  # [B_g, B_θ]
        (6, 4)
        >>> g_w = 2 * (model(x) - y).detach()[:, :, None] * x[:, None, :]  # [N, 1, 3]
        >>> counts, _ = hist_2d(g_w, model.weight, bins=(6, 4))
        >>> hists.counts[0].tolist() == counts.tolist()
        True
    """

    name = "grad_hist_2d"
    cost = "first-order"
    panel = PanelSpec(
        "hist2d",
        "gradients",
        "Gradient/parameter histogram",
        description="Which parameters get which gradients? All mass at zero: vanishing gradients.",
    )

    def __init__(self, schedule=None, bins=(40, 50), range=((-1.0, 1.0), (-2.0, 2.0))):
        super().__init__(schedule)
        self.quantity = Hist2D(bins=tuple(bins), range=(tuple(range[0]), tuple(range[1])))
        self.requires = frozenset({self.quantity})

    def compute(self, ctx: StepContext) -> list[Record]:  # noqa: D102
        assert ctx.gathered is not None
        counts = ctx.gathered[self.quantity]
        edges = self.quantity.edges()
        rows: list[Record] = [
            Histogram(ctx.step, self.name, "all", ctx.gathered.total(self.quantity), edges)
        ]
        rows += [Histogram(ctx.step, self.name, k, c, edges) for k, c in counts.items()]
        return rows

    def config(self) -> dict:  # noqa: D102
        return {
            **super().config(),
            "bins": list(self.quantity.bins),
            "range": [list(r) for r in self.quantity.range],
        }
