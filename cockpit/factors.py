"""Per-sample gradient factors and the generic reducers over them.

A layer rule (see :mod:`cockpit.layers`) turns one use of a layer in the backward
pass into one :class:`Factor` per parameter. A factor represents the N individual
gradients of that parameter *without* necessarily building them:

- :class:`AffineFactor` — ``G_n = Σ_s b[n,s]ᵀ a[n,s]`` (Linear, Conv, ConvTranspose,
  and Embedding's one-hot form): first-order quantities come from einsums over
  ``(a, b)`` and the per-sample gradient is built only when that is cheaper or
  unavoidable (second moment / histograms with S > 1).
- :class:`EmbeddingFactor` — index form ``G_n = Σ_s e_{idx[n,s]} g[n,s]ᵀ``; rows that
  a sample never touched stay implicit zeros.
- :class:`DenseFactor` — materialized ``[N, *P]`` individual gradients (biases,
  normalization layers, the ``torch.func`` fallback).

All factors are already scaled to describe the *unscaled* individual gradients.
A parameter reached several times in one forward pass gets one factor per use;
:func:`combine` merges them into a factor of the *summed* per-sample gradients
(concatenating along S when the forms agree, so no cross term is lost).

Curvature uses the *column* variants (:class:`ColumnFactor`): the same forms with a
leading axis of K columns (backpropagated square-root columns, see
:mod:`cockpit.curvature`), where the layer input ``a`` is shared by all columns and is
never copied; :func:`combine_columns` merges uses per column.

Shape letters: K columns, N batch, G groups, S shared positions, I input features,
O output features, P parameter shape, D = prod(P), B bins.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from cockpit import native
from cockpit.checks import all_finite
from cockpit.native import bin_grid as _bin_grid
from cockpit.quantities import (
    BatchDot,
    BatchL2,
    GradDot,
    Hist1D,
    Hist2D,
    IndividualGradients,
    Projection,
    Quantity,
    SecondMoment,
)

__all__ = [
    "Factor",
    "DenseFactor",
    "AffineFactor",
    "EmbeddingFactor",
    "MEAN_GRADIENT",
    "combine",
    "bin_index",
    "bin_edges_of",
    "uniform_counts",
    "ColumnFactor",
    "ColumnDenseFactor",
    "ColumnAffineFactor",
    "ColumnEmbeddingFactor",
    "combine_columns",
]

#: Key of ``directions`` under which :meth:`Factor.reduce` may receive the mean
#: gradient ``ḡ = (1/N) Σ_n g_n`` of the parameter (scaled like the factor). With it,
#: ⟨g_n, ḡ⟩ (:class:`~cockpit.quantities.GradDot`) is a projection, computed from each
#: chunk of samples on its own; without it, ḡ is the mean of the built per-sample
#: gradients, which then have to be built for all samples at once (in chunks of
#: parameter rows). The engine reads ḡ off the layer's autograd node.
MEAN_GRADIENT = "__mean_gradient__"
#: Elements per chunk when individual gradients are built (chunks of samples, or of
#: parameter rows when the Gram matrix, or ⟨g_n, ḡ⟩ without ḡ, is requested: on the
#: CPU those are bounded by :data:`ROW_CHUNK_ELEMENTS`). 8 MiB in float32. glibc
#: serves blocks above its ``mmap`` threshold from ``mmap``, and they are
#: page-faulted afresh at every step (0.21 ms/MiB against 0.05 below it); the
#: threshold rises to the largest block the process has freed, at most 32 MiB, so it
#: is about the size of the model's largest activation: 12.6 MB on All-CNN-C at
#: N = 32, where 16 MiB chunks of its 192→192 layers (14.6 MB) were faulted in every
#: step (25.7 ms at 8 samples a chunk against 39.7 ms at 11, with a plain step between
#: repetitions). Measured with ``python -m benchmarks.knob_probe --device cpu
#: --workload C --variants default,chunks_8mib,default,chunks_8mib``: batch L2
#: 1.54x/1.54x → 1.53x/1.44x, 1D histogram 1.70x/1.67x → 1.65x/1.63x, economy
#: 1.76x → 1.73x; on 3C3D (B) no change beyond the noise.
CHUNK_ELEMENTS = 1 << 21
#: The same bound off the CPU (CUDA): a caching allocator reuses its blocks without page
#: faults, and every chunk costs host time for its kernel launches. Workload B on an
#: H100 with 256 MiB chunks instead of 16 MiB (and the convolutions unfolded, see
#: :meth:`cockpit.layers.conv.ConvFactor._grouped_kernel`; ``python -m
#: benchmarks.knob_probe``): second moment 1.96x a plain step against 3.71x, 2D
#: histogram 7.20x against 10.95x, Monte-Carlo GGN 2.44x against 3.66x.
DEVICE_CHUNK_ELEMENTS = 1 << 26
#: The CPU's bound when the Gram matrix (or ⟨g_n, ḡ⟩ without ḡ) pairs all samples, so
#: that per-sample gradients come in chunks of parameter rows for all samples: fewer,
#: larger pieces are faster there than :data:`CHUNK_ELEMENTS`'s (the grouped kernel in
#: row chunks runs 1.7–2x slower per element than in sample chunks). On 3C3D, all
#: first-order quantities together measured 2.65x/2.59x a plain step with 8 MiB row
#: chunks against 2.39x/2.43x with 16 MiB (``python -m benchmarks.knob_probe --device
#: cpu --workload B --configs first_order_all --variants
#: default,chunks_16mib,default,chunks_16mib``), while the 2D histogram (sample chunks)
#: measured 1.82x/1.83x against 1.98x/1.94x.
ROW_CHUNK_ELEMENTS = 1 << 22
#: 1D histograms of affine layers without shared positions (S = 1) count the entries
#: of the outer products ``b_n a_nᵀ`` by sorting ``a_n`` instead of building them (see
#: :func:`_outer_hist1d`); ``False`` forces the materialized path (benchmarks, tests).
#: On the CPU only the edges inside each row's range are searched; on other devices
#: every edge (:func:`_outer_hist1d_all_edges`: no host synchronization). On CUDA the
#: materialized path was measured too (B, H200): 1D histogram 9.7x a plain step
#: against 8.2x with the sparse sort path, so a sort path is used on every device.
OUTER_HIST = True
#: Histograms of float32/float64 values on the CPU are counted by the compiled kernels
#: of :mod:`cockpit.native` (one pass per entry, no index array; the 2D histogram of
#: an outer product without building it) where they could be built; ``False`` forces
#: the torch path (tests compare the two, benchmarks measure both).
NATIVE = True


def chunk_elements(device: torch.device) -> int:
    """Elements per chunk of built per-sample gradients on ``device``.

    :data:`CHUNK_ELEMENTS` on the CPU, :data:`DEVICE_CHUNK_ELEMENTS` elsewhere.

    Example:
        >>> chunk_elements(torch.device("cpu")) == CHUNK_ELEMENTS
        True
        >>> chunk_elements(torch.device("meta")) == DEVICE_CHUNK_ELEMENTS
        True
    """
    return CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS


def bin_edges_of(low: float, high: float, bins: int, dtype=torch.float64) -> Tensor:
    """The ``bins + 1`` edges consistent with :func:`bin_index` (float64).

    Edge ``j`` is where ``x·k + frac`` crosses the integer ``j − ioff``; they equal
    ``numpy.linspace(low, high, bins + 1)`` up to rounding.

    Example:
        >>> import torch
        >>> bin_edges_of(-1.0, 1.0, 4)
        tensor([-1.0000, -0.5000,  0.0000,  0.5000,  1.0000], dtype=torch.float64)
        >>> x = torch.tensor([-0.75, -0.5, -1e-9, 0.0, 0.3, 0.99])  # inside [low, high)
        >>> k = bin_index(x, -1.0, 1.0, 4)  # bin k holds [edges[k], edges[k + 1])
        >>> edges = bin_edges_of(-1.0, 1.0, 4, dtype=torch.float32)
        >>> bool(((edges[k] <= x) & (x < edges[k + 1])).all())
        True
        >>> ref = torch.histogram(x.double(), bins=bin_edges_of(-1.0, 1.0, 4)).hist
        >>> ref, torch.equal(uniform_counts(x, -1.0, 1.0, 4), ref)
        (tensor([1., 2., 2., 1.], dtype=torch.float64), True)
    """
    k, frac, ioff = _bin_grid(low, high, bins)
    j = torch.arange(bins + 1, dtype=torch.float64)
    return ((j - ioff - frac) / k).to(dtype)


def _scaled_bins(
    x: Tensor, low: float, high: float, bins: int, nan: int, inplace: bool = False
) -> Tensor:
    """Float bin indices of ``x`` (a new tensor unless ``inplace``), clamped; NaN → ``nan``."""
    s, ioff = _unshifted_bins(x, low, high, bins, nan, inplace)
    return s.add_(ioff)


def _unshifted_bins(
    x: Tensor, low: float, high: float, bins: int, nan: int, inplace: bool = False
) -> tuple[Tensor, int]:
    """:func:`_scaled_bins` less the integer offset ``ioff``, and ``ioff``."""
    k, frac, ioff = _bin_grid(low, high, bins)
    s = x.mul_(k) if inplace else x.mul(k)
    if frac:
        s.add_(frac)
    s.floor_().clamp_(-ioff, bins - 1 - ioff).nan_to_num_(nan=nan - ioff)
    return s, ioff


def _index_dtype(size: int) -> torch.dtype:
    """Smallest integer dtype that holds ``0 … size − 1`` (uint8 casts are the fastest)."""
    if size <= 256:
        return torch.uint8
    if size <= 1 << 15:
        return torch.int16
    return torch.int32 if size <= 1 << 31 else torch.int64


def bin_index(x: Tensor, low: float, high: float, bins: int) -> Tensor:
    """Bin indices of ``x`` for ``bins`` equal bins on ``[low, high)``, clamped.

    Values below ``low`` go to bin 0, values at or above ``high`` to bin B - 1; bin
    ``k`` holds ``[e_k, e_{k+1})`` with the edges of :func:`bin_edges_of`, exact in the
    sign of tiny values when 0 is an edge.

    Args:
        x: Values, any shape, without NaN.
        low: Lower end of the range.
        high: Upper end of the range.
        bins: Number of bins B.

    Returns:
        Int64 tensor shaped like ``x`` with entries in ``[0, B − 1]``.

    Example:
        >>> import torch
        >>> bin_index(torch.tensor([-5.0, -1.0, -1e-9, 0.0, 0.99, 1.0, 7.0]), -1.0, 1.0, 4)
        tensor([0, 0, 1, 2, 3, 3, 3])
    """
    return _scaled_bins(x, low, high, bins, nan=bins - 1).long()


#: Index arrays at least this long are counted by several threads on the CPU
#: (``torch.bincount`` runs on one core; the weight-gradient kernels it sits between
#: use them all).
PARALLEL_COUNT_MIN = 1 << 20
_count_pool: tuple[ThreadPoolExecutor, int] | None = None  # (pool, its workers)
_count_pool_lock = threading.Lock()


def _forget_count_pool() -> None:  # a forked child has none of the parent's threads
    global _count_pool
    _count_pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_count_pool)


def _count_threads(workers: int) -> ThreadPoolExecutor:
    """At least ``workers`` threads for :func:`_bincount`, created on first use."""
    global _count_pool
    with _count_pool_lock:
        if _count_pool is None or _count_pool[1] < workers:  # more threads since: wider
            if _count_pool is not None:
                _count_pool[0].shutdown(wait=False)
            _count_pool = (ThreadPoolExecutor(workers, thread_name_prefix="cockpit-count"), workers)
        return _count_pool[0]


def _count(idx: Tensor, size: int) -> Tensor:
    """``torch.bincount(idx, minlength=size)`` of a 1-D non-negative index array.

    Long CPU arrays are split into one contiguous piece per torch thread, counted
    concurrently (torch releases the GIL inside the kernel) and summed; long ``uint8``
    arrays of at most 128 values are counted two entries at a time
    (:func:`_count_pairs`). On a GPU, ``uint8`` indices are sorted and searched
    instead (:func:`_count_sorted`).
    """
    if idx.device.type != "cpu":
        if idx.dtype == torch.uint8:
            return _count_sorted(idx, size)
        return torch.bincount(idx, minlength=size)
    if idx.dtype == torch.uint8 and size <= 128 and idx.numel() >= PAIR_COUNT_MIN:
        return _count_pairs(idx, size)
    return _bincount(idx, size)


def _bincount(idx: Tensor, size: int) -> Tensor:
    """``torch.bincount`` on the CPU, split over the torch threads for long arrays."""
    threads = torch.get_num_threads()
    if threads < 2 or idx.numel() < PARALLEL_COUNT_MIN:
        return torch.bincount(idx, minlength=size)
    pieces = idx.tensor_split(threads)
    counts = _count_threads(threads).map(
        lambda piece: torch.bincount(piece, minlength=size), pieces
    )
    return torch.stack(list(counts)).sum(0)


#: ``uint8`` index arrays at least this long are counted two entries at a time.
PAIR_COUNT_MIN = 1 << 16


def _count_pairs(idx: Tensor, size: int) -> Tensor:
    """Counts of ``0 … size − 1`` (``size ≤ 128``) in ``uint8`` indices, two at a time.

    Adjacent bytes read as one non-negative ``int16`` index a 2D histogram of
    (first, second) entry; the sum of its two marginals is the 1D histogram. Half
    as many increments, and fewer repeated ones on the crowded bins around zero:
    4M gradient entries in four crowded bins took 1.3 ms against 2.8 ms (two
    threads each). Either byte order gives the same marginals.

    Example:
        >>> import torch
        >>> _count_pairs(torch.tensor([3, 0, 3, 1, 4], dtype=torch.uint8), 5)
        tensor([1, 1, 0, 2, 1])
    """
    if size > 128:
        raise ValueError(f"pairs of uint8 indices count at most 128 values, not {size}")
    flat = idx.reshape(-1)
    tail = flat[:0]  # the entries outside the aligned pairs
    if flat.storage_offset() % 2:
        tail, flat = flat[:1], flat[1:]
    if flat.numel() % 2:
        tail, flat = torch.cat([tail, flat[-1:]]), flat[:-1]
    pairs = _bincount(flat.view(torch.int16), 256 * size).view(size, 256)
    counts = pairs.sum(1) + pairs[:, :size].sum(0)
    if tail.numel():
        counts += torch.bincount(tail, minlength=size)
    return counts


def _count_sorted(idx: Tensor, size: int) -> Tensor:
    """Counts of ``0 … size − 1`` in ``uint8`` indices by sorting: no atomics.

    Gradient entries crowd into the few bins around zero, so ``bincount``'s atomic
    increments contend on a GPU: on an H200, 14M entries took 158 µs spread over the
    bins but 1071 µs crowded, against 220–240 µs for sorting and searching either way.

    Example:
        >>> import torch
        >>> _count_sorted(torch.tensor([3, 0, 3, 1], dtype=torch.uint8), 5)
        tensor([1, 1, 0, 2, 0])
    """
    if size > 256:
        raise ValueError(f"uint8 indices count at most 256 values, not {size}")
    ordered = idx.reshape(-1).sort().values
    values = torch.arange(size, device=idx.device, dtype=torch.int16).to(torch.uint8)
    first = torch.searchsorted(ordered, values)  # position of the first entry ≥ v
    return torch.cat([first, first.new_tensor([ordered.numel()])]).diff()


def uniform_counts(x: Tensor, low: float, high: float, bins: int, inplace: bool = False) -> Tensor:
    """Histogram of all entries of ``x`` in ``bins`` equal bins on ``[low, high)``.

    Outliers are clamped into the edge bins (like :func:`bin_index`); NaN entries are
    not counted. On the CPU, the compiled kernel of :mod:`cockpit.native` bins and
    counts in one pass (:data:`NATIVE`); otherwise one pass per elementwise op over
    ``x`` with a uint8/int16 index (4–8x less memory traffic than int64 indices),
    and the same counts.

    Args:
        x: Values, any shape.
        low: Lower end of the range.
        high: Upper end of the range.
        bins: Number of bins B.
        inplace: Overwrite ``x`` (a temporary the caller no longer needs) instead of
            allocating a scratch tensor of its size.

    Returns:
        Float64 counts ``[B]``.

    Example:
        >>> import torch
        >>> uniform_counts(torch.tensor([-3.0, -0.5, 0.0, 0.25, float("nan")]), -1.0, 1.0, 4)
        tensor([1., 1., 2., 0.], dtype=torch.float64)
    """
    if NATIVE and native.available(x):
        return native.count1d(x, low, high, bins)[:bins].to(torch.float64)
    s, ioff = _unshifted_bins(x, low, high, bins, nan=bins, inplace=inplace)
    if x.device.type == "cpu" and bins < 128 and bins - 127 <= ioff <= 128:
        # every unshifted index fits int8, whose cast is 2x faster than uint8's
        # (0.7 against 1.5 ms for 4M entries); the offset then moves 4x fewer bytes,
        # and 0 … 127 are the same bytes in uint8
        idx = s.to(torch.int8).add_(ioff).view(torch.uint8)
    else:
        idx = s.add_(ioff).to(_index_dtype(bins + 1))
    counts = _count(idx.reshape(-1), bins + 1)[:bins]
    return counts.to(torch.float64)


def _hist1d(values: Tensor, q: Hist1D, inplace: bool = False) -> Tensor:
    return uniform_counts(values, q.range[0], q.range[1], q.bins, inplace=inplace)


def _hist2d(grads: Tensor, param: Tensor, q: Hist2D) -> Tensor:
    """2D histogram of the pairs ``(grads[k, j], param[..., j])`` (``param`` broadcasts).

    Pairs whose gradient entry is NaN are not counted.
    """
    (g_lo, g_hi), (p_lo, p_hi) = q.range
    bg, bp = q.bins
    size = (bg + 1) * bp
    if NATIVE and native.available(grads):
        pbin = _scaled_bins(param.to(grads.dtype), p_lo, p_hi, bp, nan=bp - 1).reshape(-1)
        counts = native.count2d(grads.reshape(-1, pbin.numel()), pbin, g_lo, g_hi, bg, bp)
        return counts[: bg * bp].to(torch.float64).view(bg, bp)
    dtype = _index_dtype(size)
    gi = _scaled_bins(grads, g_lo, g_hi, bg, nan=bg).to(dtype)
    pi = _scaled_bins(param.to(grads.dtype), p_lo, p_hi, bp, nan=bp - 1).to(dtype)
    flat = gi.mul_(bp).add_(pi).reshape(-1)
    counts = _count(flat, size)[: bg * bp]
    return counts.to(torch.float64).view(bg, bp)


def _outer_hist2d(a: Tensor, b: Tensor, param: Tensor, q: Hist2D) -> Tensor:
    """:func:`_hist2d` of the entries ``b[n, g, o] · a[n, g, i]`` (S = 1), never built.

    ``a`` ``[N, G, I]``, ``b`` ``[N, G, O]``, ``param`` with ``G·O·I`` entries in
    (group, output, input) order. Needs :mod:`cockpit.native`: each entry is formed
    and binned in registers, the same float product the materialized path bins.
    """
    (g_lo, g_hi), (p_lo, p_hi) = q.range
    bg, bp = q.bins
    groups, o_, i_ = a.shape[1], b.shape[2], a.shape[2]
    pbin = _scaled_bins(param.to(a.dtype), p_lo, p_hi, bp, nan=bp - 1).reshape(groups, o_ * i_)
    counts = sum(
        native.outer2d(a[:, g], b[:, g], pbin[g], g_lo, g_hi, bg, bp) for g in range(groups)
    )
    return counts[: bg * bp].to(torch.float64).view(bg, bp)


def _sorted_rows(a: Tensor) -> Tensor:
    """The rows of ``a`` ``[R, I]`` sorted ascending (values only).

    On the CPU numpy's vectorized sort is used: ``torch.sort`` also builds the
    permutation and was measured 4–7x slower on ``[128, 784]`` (2.6 ms against 0.39 ms
    in float32, 0.69 ms in float64).
    """
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(a.detach().numpy(), axis=1))
    return a.sort(1).values


def _outer_hist1d_all_edges(a: Tensor, b: Tensor, q: Hist1D) -> Tensor:
    """:func:`_outer_hist1d` searching every interior edge of every row: no host sync.

    The sparse form searches only the edges inside each row's range, which needs the
    number of such (row, edge) pairs on the host (a synchronization on a GPU, and about
    65 small ops per layer). Here each row ``(r, o)`` searches all ``B − 1`` interior
    edges: ``R·O·(B − 1)`` binary searches, which a GPU does in parallel, in a fixed
    number of ops (chunked over samples to at most :func:`chunk_elements` thresholds).
    """
    r_, i_ = a.shape
    o_ = b.shape[1]
    bins, (low, high) = q.bins, q.range
    if bins == 1:
        return torch.full((1,), float(r_ * o_ * i_), dtype=torch.float64, device=a.device)
    srt = _sorted_rows(a).to(torch.float64)  # [R, I]
    inner = bin_edges_of(low, high, bins).to(a.device)[1:-1]  # [B − 1]
    below = torch.zeros(bins - 1, dtype=torch.float64, device=a.device)
    chunk = max(1, chunk_elements(a.device) // (o_ * (bins - 1)))
    for start in range(0, r_, chunk):
        bc = b[start : start + chunk].to(torch.float64)[:, :, None]  # [r, O, 1]
        thr = inner / bc  # [r, O, B − 1]
        neg = bc < 0
        # b·a < e  ⟺  a < e/b (b > 0);  b < 0: I − #(a < nextafter(e/b, +∞));
        # b = 0: the entry 0 is below e iff 0 < e
        thr = torch.where(neg, torch.nextafter(thr, thr.new_tensor(math.inf)), thr)
        thr = torch.where(bc == 0, torch.where(inner > 0, math.inf, -math.inf), thr)
        n_below = torch.searchsorted(srt[start : start + chunk], thr.flatten(1))
        n_below = n_below.view(thr.shape)
        n_below = torch.where(neg, i_ - n_below, n_below)
        below += n_below.sum((0, 1), dtype=torch.float64)
    total = float(r_ * o_ * i_)
    counts = torch.empty(bins, dtype=torch.float64, device=a.device)
    counts[0] = below[0]
    counts[1:-1] = below[1:] - below[:-1]
    counts[-1] = total - below[-1]
    return counts


def _outer_hist1d(a: Tensor, b: Tensor, q: Hist1D) -> Tensor:
    """Histogram of all entries ``b[r, o] · a[r, i]`` without building them.

    For row ``(r, o)`` the entries ``b[r,o] · a[r,:]`` are monotone in ``a[r,:]``, so
    with ``a[r]`` sorted the number of them below an edge ``e`` is one
    ``searchsorted`` of ``e / b[r,o]`` in ``a[r]`` (counting from the top for
    ``b < 0``). A bin's count is then a difference of two positions (telescoping over
    the edges). On the CPU the compiled kernel (:func:`cockpit.native.outer1d`)
    searches each row for the runs of its bins, binning every probe exactly as an
    entry is binned: equal to binning the materialized entries. Without it, only the
    edges strictly inside each row's range ``[min, max]`` are searched
    (:func:`_outer_hist1d_sparse`: a row inside one bin costs nothing beyond its
    range); on other devices every edge, without a host synchronization
    (:func:`_outer_hist1d_all_edges`). These two agree with binning the materialized
    entries up to rounding at the bin edges.

    Args:
        a: ``[R, I]`` finite.
        b: ``[R, O]`` finite.
        q: The histogram's bins and range.

    Returns:
        Float64 counts ``[B]``.
    """
    if NATIVE and native.available(a, b):
        # b's rows sorted too: the counts do not depend on their order, and the kernel's
        # searches start where the previous row's runs ended
        counts = native.outer1d(_sorted_rows(a), _sorted_rows(b), q.range[0], q.range[1], q.bins)
        return counts[: q.bins].to(torch.float64)
    count = _outer_hist1d_sparse if a.device.type == "cpu" else _outer_hist1d_all_edges
    return count(a, b, q)


def _outer_hist1d_sparse(a: Tensor, b: Tensor, q: Hist1D) -> Tensor:
    """:func:`_outer_hist1d` searching only the edges inside each row's range (CPU)."""
    r_, i_ = a.shape
    bins, (low, high) = q.bins, q.range
    b64 = b.to(torch.float64)
    srt = _sorted_rows(a).to(torch.float64)  # [R, I]
    ends = torch.stack([b64 * srt[:, :1], b64 * srt[:, -1:]])  # [2, R, O]
    k = bin_index(ends, low, high, bins)
    lo, hi = k.min(0).values, k.max(0).values  # [R, O]
    counts = torch.bincount(hi.reshape(-1), minlength=bins).to(torch.float64) * i_
    span = (hi - lo).reshape(-1)  # edges inside the row's range (0 where b = 0)
    rows = span.nonzero().squeeze(1)  # ascending, so grouped by the sample r
    if rows.numel() == 0:
        return counts
    m = span[rows]
    first = lo.reshape(-1)[rows]
    scale = b64.reshape(-1)[rows]
    r = torch.div(rows, b.shape[1], rounding_mode="floor")
    # one (row, edge) pair per edge inside the row's range
    t = int(m.sum())
    pair = torch.repeat_interleave(torch.arange(rows.numel(), device=a.device), m)
    start = torch.cumsum(m, 0) - m
    edge = first[pair] + 1 + torch.arange(t, device=a.device) - start[pair]
    edges = bin_edges_of(low, high, bins).to(a.device)
    scale = scale[pair]
    thr = edges[edge] / scale
    neg = scale < 0
    # b·a < e  ⟺  a < e/b for b > 0;  for b < 0 it is a > e/b, counted as I − #(a ≤ e/b)
    # = I − #(a < nextafter(e/b, +∞))
    thr = torch.where(neg, torch.nextafter(thr, thr.new_tensor(math.inf)), thr)
    pr = r[pair]
    per_r = torch.bincount(pr, minlength=r_)
    pos = torch.arange(t, device=a.device) - (torch.cumsum(per_r, 0) - per_r)[pr]
    padded = thr.new_full((r_, int(per_r.max())), math.inf)
    padded[pr, pos] = thr
    below = torch.searchsorted(srt, padded)[pr, pos]  # entries of a[r] < thr
    below = torch.where(neg, i_ - below, below).to(torch.float64)  # entries b·a < edge
    counts += torch.bincount(edge - 1, weights=below, minlength=bins)
    counts -= torch.bincount(edge, weights=below, minlength=bins)[:bins]
    return counts


class Factor:
    """Individual gradients of one parameter tensor, in some factored form.

    Attributes:
        n: Batch size N.
        shape: Parameter shape P.

    Example:
        >>> import torch
        >>> from cockpit.quantities import BatchL2, SecondMoment
        >>> class Outer(Factor):  # G_n = c_n · u: only to_dense is needed
        ...     def __init__(self, c, u):
        ...         self.c, self.u, self.n, self.shape = c, u, c.shape[0], u.shape
        ...     def to_dense(self):
        ...         return self.c[:, None] * self.u  # [N, *P]
        >>> f = Outer(torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0]))  # N = 2, P = [2]
        >>> f.to_dense()
        tensor([[ 3.,  4.],
                [-6., -8.]])
        >>> out = f.reduce([BatchL2(), SecondMoment()], param=torch.zeros(2), directions={})
        >>> out[BatchL2()]  # ‖c_n u‖² = 25 c_n², [N]
        tensor([ 25., 100.])
        >>> out[SecondMoment()]  # Σ_n c_n² u², [*P]
        tensor([45., 80.])
    """

    n: int
    shape: torch.Size

    def to_dense(self) -> Tensor:
        """Build the individual gradients ``[N, *P]``."""
        raise NotImplementedError

    def reduce(
        self, requests: Iterable[Quantity], param: Tensor, directions: dict[str, Tensor | None]
    ) -> dict[Quantity, Tensor]:
        """Compute the requested quantities.

        Args:
            requests: Quantity keys to compute.
            param: The parameter's current value (for 2D histograms).
            directions: ``{projection key: tensor shaped like P or None}``.

        Returns:
            ``{quantity: tensor}`` for every request.
        """
        return DenseFactor(self.to_dense()).reduce(requests, param, directions)

    def reduce_and_keep(
        self, requests: Iterable[Quantity], param: Tensor, directions: dict[str, Tensor | None]
    ) -> tuple[dict[Quantity, Tensor], Factor]:
        """:meth:`reduce`, and the factor to keep for projections after the pass.

        ``Engine.gather(keep_factors=True)`` keeps one factor per parameter so that
        :meth:`cockpit.quantities.Gathered.project` can project onto a direction known
        only later (alpha's update). By default that is this factor, slimmed by
        :meth:`drop_cache`; :class:`AffineFactor` keeps the per-sample gradients instead
        where the reduction built them whole anyway and they are no larger than what the
        factor holds (a projection then costs N·D multiply-adds, not a convolution).

        Example:
            >>> import torch
            >>> from cockpit.quantities import BatchL2
            >>> f = DenseFactor(torch.ones(2, 3))
            >>> out, kept = f.reduce_and_keep([BatchL2()], torch.zeros(3), {})
            >>> out[BatchL2()], kept is f
            (tensor([3., 3.]), True)
        """
        out = self.reduce(requests, param, directions)
        self.drop_cache()
        return out, self

    def drop_cache(self) -> None:
        """Free what the factor can rebuild on demand (kept factors are slimmed with it).

        The base factor caches nothing; e.g. :class:`cockpit.layers.conv.ConvFactor`
        frees its unfolded patches here.

        Example:
            >>> import torch
            >>> f = DenseFactor(torch.ones(2, 3))
            >>> f.drop_cache(); f.to_dense().shape  # still complete afterwards
            torch.Size([2, 3])
        """


class DenseFactor(Factor):
    """Materialized individual gradients ``[N, *P]``.

    Args:
        grads: The individual gradients.
        owned: ``grads`` is a temporary built for this reduction only; the last
            histogram may then bin it in place instead of allocating a copy.

    Example:
        >>> import torch
        >>> from cockpit.quantities import BatchDot, GradDot, Hist1D, Projection
        >>> g = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 2.0]])  # N = 3 gradients of a [2] bias
        >>> f = DenseFactor(g)
        >>> f.n, f.shape, f.to_dense() is g
        (3, torch.Size([2]), True)
        >>> hist = Hist1D(bins=4, range=(-2.0, 2.0))
        >>> out = f.reduce(
        ...     [BatchDot(), GradDot(), Projection("u"), hist],
        ...     param=torch.zeros(2),
        ...     directions={"u": torch.tensor([1.0, 0.0])},
        ... )
        >>> out[BatchDot()]  # ⟨g_n, g_m⟩, [N, N]
        tensor([[ 5.,  1.,  4.],
                [ 1., 10., -2.],
                [ 4., -2.,  4.]])
        >>> out[GradDot()]  # ⟨g_n, ḡ⟩ with ḡ = (4/3, 1), [N]
        tensor([3.3333, 3.0000, 2.0000])
        >>> out[Projection("u")]  # ⟨g_n, u⟩, [N]
        tensor([1., 3., 0.])
        >>> out[hist]  # entries 1, 2, 3, -1, 0, 2 in [-2, -1), ..., [1, 2); 2 and 3 clamp
        tensor([0., 1., 1., 4.], dtype=torch.float64)
    """

    def __init__(self, grads: Tensor, owned: bool = False) -> None:
        self.grads = grads
        self.owned = owned
        self.n = grads.shape[0]
        self.shape = grads.shape[1:]

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.grads

    def reduce(  # noqa: D102
        self, requests: Iterable[Quantity], param: Tensor, directions: dict[str, Tensor | None]
    ) -> dict[Quantity, Tensor]:
        flat = self.grads.reshape(self.n, -1)
        out: dict[Quantity, Tensor] = {}
        gram = None
        # the last request may overwrite an owned temporary: a 1D histogram bins it in
        # place, else the second moment squares it in place (no second [N, D] block)
        requests = sorted(
            requests, key=lambda q: (isinstance(q, SecondMoment), isinstance(q, Hist1D))
        )
        last = requests[-1] if requests and self.owned else None
        if any(isinstance(q, IndividualGradients) for q in requests):
            last = None  # handed out to the caller: never overwrite
        for q in requests:
            if isinstance(q, BatchL2):  # norms reduce without an [N, D] temporary
                out[q] = torch.linalg.vector_norm(flat, dim=1).square_()
            elif isinstance(q, BatchDot):
                gram = flat @ flat.T if gram is None else gram
                out[q] = gram
            elif isinstance(q, GradDot):
                mean = directions.get(MEAN_GRADIENT)
                mean = flat.mean(0) if mean is None else mean.reshape(-1).to(flat.dtype)
                out[q] = flat @ mean
            elif isinstance(q, SecondMoment):
                # a product and a column sum: 1.6x faster than einsum("ni,ni->i"),
                # which runs as D batched 1×N·N×1 matmuls
                squares = flat.square_() if q is last else flat * flat
                out[q] = squares.sum(0).view(self.shape)
            elif isinstance(q, Projection):
                u = directions.get(q.key)
                out[q] = (
                    flat.new_zeros(self.n) if u is None else flat @ u.reshape(-1).to(flat.dtype)
                )
            elif isinstance(q, IndividualGradients):
                out[q] = self.grads
            elif isinstance(q, Hist1D):
                out[q] = _hist1d(flat, q, inplace=q is last)
            elif isinstance(q, Hist2D):
                out[q] = _hist2d(flat, param.reshape(1, -1), q)
            else:
                raise TypeError(f"DenseFactor cannot compute {q!r}")
        return out


class AffineFactor(Factor):
    """Individual gradients ``G_n[g] = Σ_s b[n,g,s]ᵀ a[n,g,s]`` of an affine weight.

    Args:
        a: Layer inputs ``[N, G, S, I]`` (unfolded for convolutions).
        b: Output gradients ``[N, G, S, O]``, already scaled.
        shape: Parameter shape P with ``prod(P) = G·O·I`` (rows group-major).

    Example:
        >>> import torch
        >>> from cockpit.quantities import BatchDot, BatchL2, Hist1D, Projection, SecondMoment
        >>> _ = torch.manual_seed(0)
        >>> n, s, i, o = 4, 3, 5, 2  # Linear(5, 2) on sequences of length 3
        >>> a = torch.randn(n, 1, s, i, dtype=torch.float64)  # inputs [N, G, S, I]
        >>> b = torch.randn(n, 1, s, o, dtype=torch.float64)  # output gradients [N, G, S, O]
        >>> f = AffineFactor(a, b, (o, i))
        >>> dense = f.to_dense()  # G_n = Σ_s b[n,s]ᵀ a[n,s], [N, *P]
        >>> dense.shape, torch.allclose(dense[0], b[0, 0].T @ a[0, 0])
        (torch.Size([4, 2, 5]), True)
        >>> f.to_dense(1, 3).shape  # samples 1:3 only
        torch.Size([2, 2, 5])
        >>> torch.equal(f.to_dense_rows(1, 2), dense[:, 1:2])  # parameter row 1, all samples
        True
        >>> qs = [BatchL2(), BatchDot(), SecondMoment(), Projection("u"), Hist1D(bins=8)]
        >>> u = {"u": torch.randn(o, i, dtype=torch.float64)}
        >>> got = f.reduce(qs, torch.zeros(o, i), u)  # einsums over (a, b) where cheaper
        >>> ref = DenseFactor(dense).reduce(qs, torch.zeros(o, i), u)  # from the built G_n
        >>> all(torch.allclose(got[q], ref[q]) for q in qs)
        True
        >>> f1 = AffineFactor(a[:, :, :1], b[:, :, :1], (o, i))  # S = 1: nothing is built
        >>> got = f1.reduce(qs, torch.zeros(o, i), u)
        >>> ref = DenseFactor(f1.to_dense()).reduce(qs, torch.zeros(o, i), u)
        >>> all(torch.allclose(got[q], ref[q]) for q in qs)
        True
    """

    #: Whether ``a`` and ``b`` are finite, once :meth:`_finite` has looked.
    _is_finite: bool | None = None

    def __init__(self, a: Tensor, b: Tensor, shape: Sequence[int]) -> None:
        if a.dim() != 4 or b.dim() != 4 or a.shape[:3] != b.shape[:3]:
            raise ValueError(
                f"AffineFactor needs a [N,G,S,I], b [N,G,S,O]; got {a.shape}, {b.shape}"
            )
        self.a, self.b = a, b
        self.n, self.groups, self.s = a.shape[0], a.shape[1], a.shape[2]
        self.shape = torch.Size(shape)

    @property
    def _dims(self) -> tuple[int, int]:
        return self.b.shape[3], self.a.shape[3]

    def to_dense(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Build ``G_n`` for samples ``start:stop`` as ``[K, *P]``."""
        a, b = self.a[start:stop], self.b[start:stop]
        if self.s == 1:
            g = b[:, :, 0, :, None] * a[:, :, 0, None, :]
        else:
            g = torch.einsum("ngso,ngsi->ngoi", b, a)
        return g.reshape(g.shape[0], *self.shape)

    def _materialize_cost(self) -> int:
        o, i = self._dims
        return self.s * o * i

    def _gram_cost(self) -> int:
        o, i = self._dims
        return self.s * self.s * (o + i)

    def reduce(  # noqa: D102
        self, requests: Iterable[Quantity], param: Tensor, directions: dict[str, Tensor | None]
    ) -> dict[Quantity, Tensor]:
        requests = list(requests)
        out: dict[Quantity, Tensor] = {}
        cheap = self._cheap_kinds(requests)
        rest = [q for q in requests if not isinstance(q, cheap)]
        if rest and self.s > 1:
            # the per-sample gradients get built anyway: norms and projections read
            # off them cost O(N·D), the factored forms O(N·S·O·I) or O(N·S²·(O + I))
            cheap, rest = (), requests
        for q in requests:
            if isinstance(q, cheap):
                out[q] = self._cheap(q, param, directions, out)
        if rest:
            out.update(self._materialized(rest, param, directions))
        return out

    def reduce_and_keep(  # noqa: D102
        self, requests: Iterable[Quantity], param: Tensor, directions: dict[str, Tensor | None]
    ) -> tuple[dict[Quantity, Tensor], Factor]:
        requests = list(requests)
        self.drop_cache()
        held = sum(
            t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, Tensor)
        )
        numel = self.shape.numel()
        cheap = self._cheap_kinds(requests)
        device, dtype = param.device, self._dtype()
        if (
            self.s > 1  # with S = 1 a projection costs N·D from (a, b) as well
            and not all(isinstance(q, cheap) for q in requests)  # G_n get built anyway …
            and self.n * numel <= chunk_elements(device)  # … in one piece …
            and self.n * numel * dtype.itemsize <= held  # … no larger than (a, b) or (x, g)
        ):
            dense = self.to_dense()
            return DenseFactor(dense).reduce(requests, param, directions), DenseFactor(dense)
        return super().reduce_and_keep(requests, param, directions)

    def _dtype(self) -> torch.dtype:
        return self.b.dtype

    def _finite(self) -> bool:
        """Whether ``a`` and ``b`` are finite (checked once per factor)."""
        if self._is_finite is None:
            self._is_finite = all_finite((self.a, self.b))
        return self._is_finite

    def _cheap_kinds(self, requests: list[Quantity]) -> tuple[type, ...]:
        """The quantity types this factor computes without building per-sample gradients."""
        if self.s == 1:
            cheap: tuple[type, ...] = (BatchL2, BatchDot, GradDot, SecondMoment, Projection)
            if OUTER_HIST and any(isinstance(q, Hist1D) for q in requests) and self._finite():
                cheap += (Hist1D,)
            if NATIVE and native.available(self.a, self.b):
                cheap += (Hist2D,)
            return cheap
        if self._gram_cost() < self._materialize_cost():
            return (BatchL2, Projection)
        return (Projection,)

    def _cheap(
        self,
        q: Quantity,
        param: Tensor,
        directions: dict[str, Tensor | None],
        done: dict[Quantity, Tensor],
    ) -> Tensor:
        a, b = self.a, self.b
        o, i = self._dims
        if isinstance(q, Projection):
            u = directions.get(q.key)
            if u is None:
                return a.new_zeros(self.n)
            u = u.reshape(self.groups, o, i).to(a.dtype)
            ua = torch.einsum("ngsi,goi->ngso", a, u)
            return (ua * b).sum((1, 2, 3))
        if self.s == 1:
            a1, b1 = a[:, :, 0], b[:, :, 0]
            if isinstance(q, BatchL2):
                return ((b1 * b1).sum(-1) * (a1 * a1).sum(-1)).sum(1)
            if isinstance(q, (BatchDot, GradDot)):
                gram = done.get(BatchDot())
                if gram is None:
                    gram = (
                        torch.einsum("ngo,mgo->gnm", b1, b1) * torch.einsum("ngi,mgi->gnm", a1, a1)
                    ).sum(0)
                return gram if isinstance(q, BatchDot) else gram.mean(1)
            if isinstance(q, SecondMoment):
                return torch.einsum("ngo,ngi->goi", b1 * b1, a1 * a1).reshape(self.shape)
            if isinstance(q, Hist1D):
                return _outer_hist1d(a1.reshape(-1, i), b1.reshape(-1, o), q)
            if isinstance(q, Hist2D):
                return _outer_hist2d(a1, b1, param, q)
        if isinstance(q, BatchL2):
            bb = torch.einsum("ngso,ngto->ngst", b, b)
            aa = torch.einsum("ngsi,ngti->ngst", a, a)
            return (bb * aa).sum((1, 2, 3))
        raise TypeError(f"AffineFactor has no cheap form for {q!r}")  # pragma: no cover

    def to_dense_rows(self, lo: int, hi: int) -> Tensor:
        """Build rows ``lo:hi`` of every ``G_n`` (one group only) as ``[N, hi − lo, *P[1:]]``."""
        if self.groups != 1:
            raise ValueError(f"rows of a grouped factor ({self.groups} groups) are not contiguous")
        a, b = self.a, self.b[..., lo:hi]
        if self.s == 1:
            g = b[:, :, 0, :, None] * a[:, :, 0, None, :]
        else:
            g = torch.einsum("ngso,ngsi->ngoi", b, a)
        return g.reshape(self.n, hi - lo, *self.shape[1:])

    def _materialized(
        self, requests: list[Quantity], param: Tensor, directions: dict[str, Tensor | None]
    ) -> dict[Quantity, Tensor]:
        numel = self.shape.numel()
        limit = chunk_elements(self.b.device)
        needs_all_samples = any(
            isinstance(q, BatchDot)
            or (isinstance(q, GradDot) and directions.get(MEAN_GRADIENT) is None)
            for q in requests
        )
        if needs_all_samples and self.b.device.type == "cpu":
            limit = max(limit, ROW_CHUNK_ELEMENTS)
        if self.n * numel <= limit:
            return DenseFactor(self.to_dense(), owned=True).reduce(requests, param, directions)
        rows = self.shape[0]
        if needs_all_samples and self.groups == 1 and rows > 1:
            # the Gram matrix and ⟨g_n, ḡ⟩ pair every sample with every other: chunks
            # of output rows for all samples, over which every quantity adds up (or
            # concatenates). Without them, chunks of samples are as fast or faster
            # (3C3D conv2/conv3 second moment 24/27 ms against 25/33, All-CNN-C's
            # 192→192 layer 55 against 78; 1D histograms alike).
            step = max(1, limit // (self.n * (numel // rows)))
            parts = []
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)
                dirs = {
                    k: None if u is None else u.reshape(self.shape)[lo:hi]
                    for k, u in directions.items()
                }
                dense = DenseFactor(self.to_dense_rows(lo, hi), owned=True)
                parts.append(dense.reduce(requests, param.reshape(self.shape)[lo:hi], dirs))
            return _merge_row_chunks(requests, parts)
        if needs_all_samples:  # grouped
            return DenseFactor(self.to_dense(), owned=True).reduce(requests, param, directions)
        chunk = max(1, limit // max(1, numel))
        chunk = -(-self.n // -(-self.n // chunk))  # as many chunks, of equal size
        parts = []
        for start in range(0, self.n, chunk):
            dense = DenseFactor(self.to_dense(start, start + chunk), owned=True)
            parts.append(dense.reduce(requests, param, directions))
        return _merge_chunks(requests, parts)


def _merge_chunks(requests: list[Quantity], parts: list[dict[Quantity, Tensor]]) -> dict:
    """Merge results of sample chunks: per-sample rows concatenate, sums add."""
    out = {}
    for q in requests:
        values = [p[q] for p in parts]
        if isinstance(q, (BatchL2, GradDot, Projection, IndividualGradients)):
            out[q] = torch.cat(values)
        else:  # SecondMoment, Hist1D, Hist2D: sums over samples
            out[q] = torch.stack(values).sum(0)
    return out


def _merge_row_chunks(requests: list[Quantity], parts: list[dict[Quantity, Tensor]]) -> dict:
    """Merge results of parameter-row chunks: per-coordinate values concatenate, the rest adds."""
    out = {}
    for q in requests:
        values = [p[q] for p in parts]
        if isinstance(q, SecondMoment):
            out[q] = torch.cat(values)
        elif isinstance(q, IndividualGradients):
            out[q] = torch.cat(values, 1)
        else:  # BatchL2, BatchDot, GradDot, Projection, Hist1D, Hist2D: sums over coordinates
            out[q] = torch.stack(values).sum(0)
    return out


class EmbeddingFactor(Factor):
    """Individual gradients of an embedding table, ``G_n = Σ_s e_{idx[n,s]} g[n,s]ᵀ``.

    Args:
        idx: Indices ``[N, S]`` (entries equal to ``padding_idx`` are dropped).
        g: Output gradients ``[N, S, E]``, already scaled.
        num_embeddings: V.
        padding_idx: Index whose row gets no gradient, or None.

    Example:
        >>> import torch
        >>> from cockpit.quantities import BatchL2, SecondMoment
        >>> idx = torch.tensor([[1, 1, 0], [2, 0, 3]])  # N = 2 samples of S = 3 tokens, 0 pads
        >>> g = torch.arange(12.0).view(2, 3, 2)  # output gradients [N, S, E]
        >>> f = EmbeddingFactor(idx, g, num_embeddings=4, padding_idx=0)
        >>> sample, vocab, rows = f.rows()  # the two uses of token 1 in sample 0 add up
        >>> sample.tolist(), vocab.tolist(), rows.tolist()
        ([0, 1, 1], [1, 2, 3], [[2.0, 4.0], [6.0, 7.0], [10.0, 11.0]])
        >>> f.to_dense().shape  # [N, V, E]
        torch.Size([2, 4, 2])
        >>> torch.equal(f.to_affine().to_dense(), f.to_dense())  # the one-hot form agrees
        True
        >>> out = f.reduce([BatchL2(), SecondMoment()], torch.zeros(4, 2), {})
        >>> out[BatchL2()]  # 2² + 4² and 6² + 7² + 10² + 11², [N]
        tensor([ 20., 306.])
        >>> out[SecondMoment()]  # [V, E]; the padding row stays zero
        tensor([[  0.,   0.],
                [  4.,  16.],
                [ 36.,  49.],
                [100., 121.]])
    """

    def __init__(self, idx: Tensor, g: Tensor, num_embeddings: int, padding_idx: int | None):
        self.idx, self.g = idx, g
        self.n = idx.shape[0]
        self.num_embeddings = num_embeddings
        self.padding_idx = padding_idx
        self.shape = torch.Size((num_embeddings, g.shape[-1]))
        self._rows: tuple[Tensor, Tensor, Tensor] | None = None

    def rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """Non-zero rows: sample index ``[U]``, vocabulary index ``[U]``, row ``[U, E]``."""
        if self._rows is None:
            n, s = self.idx.shape
            sample = torch.arange(n, device=self.idx.device).repeat_interleave(s)
            vocab = self.idx.reshape(-1)
            g = self.g.reshape(n * s, -1)
            if self.padding_idx is not None:
                keep = vocab != self.padding_idx
                sample, vocab, g = sample[keep], vocab[keep], g[keep]
            key = sample * self.num_embeddings + vocab
            uniq, inverse = torch.unique(key, return_inverse=True)
            rows = g.new_zeros(uniq.numel(), g.shape[1]).index_add_(0, inverse, g)
            self._rows = (uniq // self.num_embeddings, uniq % self.num_embeddings, rows)
        return self._rows

    def to_dense(self) -> Tensor:  # noqa: D102
        sample, vocab, rows = self.rows()
        dense = rows.new_zeros(self.n, *self.shape)
        dense[sample, vocab] = rows
        return dense

    def to_affine(self) -> AffineFactor:
        """The same gradients in affine form: ``b = onehot(idx)`` ``[N,S,V]``, ``a = g``."""
        onehot = torch.nn.functional.one_hot(self.idx, self.num_embeddings).to(self.g.dtype)
        if self.padding_idx is not None:
            onehot[..., self.padding_idx] = 0
        return AffineFactor(self.g.unsqueeze(1), onehot.unsqueeze(1), self.shape)

    def reduce(  # noqa: D102
        self, requests: Iterable[Quantity], param: Tensor, directions: dict[str, Tensor | None]
    ) -> dict[Quantity, Tensor]:
        sample, vocab, rows = self.rows()
        out: dict[Quantity, Tensor] = {}
        zeros_n = rows.new_zeros(self.n)
        for q in requests:
            if isinstance(q, BatchL2):
                out[q] = zeros_n.index_add(0, sample, (rows * rows).sum(1))
            elif isinstance(q, SecondMoment):
                out[q] = rows.new_zeros(self.shape).index_add_(0, vocab, rows * rows)
            elif isinstance(q, Projection):
                u = directions.get(q.key)
                out[q] = (
                    zeros_n.clone()
                    if u is None
                    else zeros_n.index_add(0, sample, (rows * u.to(rows.dtype)[vocab]).sum(1))
                )
            elif isinstance(q, GradDot):
                mean = rows.new_zeros(self.shape).index_add_(0, vocab, rows) / self.n
                out[q] = zeros_n.index_add(0, sample, (rows * mean[vocab]).sum(1))
            elif isinstance(q, BatchDot):
                used, col = torch.unique(vocab, return_inverse=True)
                compact = rows.new_zeros(self.n, used.numel(), rows.shape[1])
                compact[sample, col] = rows
                compact = compact.reshape(self.n, -1)
                out[q] = compact @ compact.T
            elif isinstance(q, IndividualGradients):
                out[q] = self.to_dense()
            elif isinstance(q, Hist1D):
                counts = _hist1d(rows, q)
                implicit_zeros = self.n * self.shape.numel() - rows.numel()
                counts[bin_index(rows.new_zeros(1), *q.range, q.bins)] += implicit_zeros
                out[q] = counts
            elif isinstance(q, Hist2D):
                # Every sample contributes (0, θ_j) for every entry, corrected on touched rows.
                zero_row = bin_index(rows.new_zeros(1), *q.range[0], q.bins[0])
                p_lo, p_hi = q.range[1]
                theta = param.to(rows.dtype)
                base = torch.bincount(
                    bin_index(theta.reshape(-1), p_lo, p_hi, q.bins[1]), minlength=q.bins[1]
                ).to(torch.float64)
                counts = torch.zeros(q.bins, dtype=torch.float64, device=rows.device)
                counts[zero_row] += self.n * base
                touched = theta[vocab]
                counts += _hist2d(rows, touched, q) - _hist2d(torch.zeros_like(rows), touched, q)
                out[q] = counts
            else:
                raise TypeError(f"EmbeddingFactor cannot compute {q!r}")
        return out


def combine(factors: Sequence[Factor]) -> Factor:
    """Merge the factors of several uses of one parameter into one factor.

    The result represents the per-sample *sum* of the uses' individual gradients.
    Affine and embedding factors are concatenated along S (exact, no cross term is
    lost); anything else is materialized and added.

    Example:
        >>> import torch
        >>> from cockpit.quantities import BatchL2
        >>> _ = torch.manual_seed(0)
        >>> n, i, o = 3, 4, 2  # one Linear(4, 2) weight used twice in a forward pass
        >>> a1, a2 = torch.randn(n, 1, 1, i), torch.randn(n, 1, 1, i)  # inputs [N, G, S, I]
        >>> b1, b2 = torch.randn(n, 1, 1, o), torch.randn(n, 1, 1, o)  # output gradients
        >>> uses = [AffineFactor(a1, b1, (o, i)), AffineFactor(a2, b2, (o, i))]
        >>> summed = uses[0].to_dense() + uses[1].to_dense()  # [N, O, I]
        >>> merged = combine(uses)
        >>> type(merged).__name__, merged.s  # concatenated along S
        ('AffineFactor', 2)
        >>> torch.allclose(merged.to_dense(), summed)
        True
        >>> l2 = merged.reduce([BatchL2()], torch.zeros(o, i), {})[BatchL2()]  # with cross terms
        >>> torch.allclose(l2, summed.flatten(1).square().sum(1))
        True
        >>> mixed = combine([uses[0], DenseFactor(uses[1].to_dense())])  # built and added
        >>> type(mixed).__name__, torch.allclose(mixed.to_dense(), summed)
        ('DenseFactor', True)
    """
    if len(factors) == 1:
        return factors[0]
    if all(isinstance(f, EmbeddingFactor) for f in factors):
        first = factors[0]
        assert isinstance(first, EmbeddingFactor)
        return EmbeddingFactor(
            torch.cat([f.idx for f in factors], 1),  # type: ignore[attr-defined]
            torch.cat([f.g for f in factors], 1),  # type: ignore[attr-defined]
            first.num_embeddings,
            first.padding_idx,
        )
    if all(isinstance(f, (AffineFactor, EmbeddingFactor)) for f in factors):
        affine = [f.to_affine() if isinstance(f, EmbeddingFactor) else f for f in factors]
        if len({(f.groups, f._dims) for f in affine}) == 1:  # type: ignore[attr-defined]
            return AffineFactor(
                torch.cat([f.a for f in affine], 2),  # type: ignore[attr-defined]
                torch.cat([f.b for f in affine], 2),  # type: ignore[attr-defined]
                affine[0].shape,
            )
    total = factors[0].to_dense().clone()
    for f in factors[1:]:
        total += f.to_dense()
    return DenseFactor(total)


# ----------------------------------------------------------------------------------------
# column factors: K pseudo-losses backpropagated at once (curvature)
# ----------------------------------------------------------------------------------------


class ColumnFactor:
    """Individual gradients ``G[k, n]`` of one parameter for K columns at once.

    Curvature (see :mod:`cockpit.curvature`) backpropagates K columns of a square root
    (of the loss Hessian, or of an activation's residual term) instead of one output
    gradient, so each column k gives its own N per-sample gradients. The diagonal
    curvature of a parameter is then the (weighted) second moment over the K·N
    pseudo-samples, :meth:`sum_of_squares`.

    Attributes:
        k: Number of columns K.
        n: Batch size N.
        shape: Parameter shape P.

    Example:
        >>> import torch
        >>> g = torch.tensor([[[1.0, 2.0], [0.0, -1.0]], [[3.0, 0.0], [1.0, 1.0]]])  # [K, N, *P]
        >>> f = ColumnDenseFactor(g)
        >>> f.k, f.n, f.shape, f.to_dense() is g
        (2, 2, torch.Size([2]), True)
        >>> f.sum_of_squares()  # Σ_k Σ_n G[k, n]², [*P]
        tensor([11.,  6.])
        >>> f.sum_of_squares(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))  # weights [K, N]
        tensor([-7.,  6.])
    """

    k: int
    n: int
    shape: torch.Size

    def to_dense(self) -> Tensor:
        """Build the gradients ``[K, N, *P]``."""
        raise NotImplementedError

    def sum_of_squares(self, weights: Tensor | None = None) -> Tensor:
        """``Σ_k Σ_n w[k, n] G[k, n]²`` per coordinate, shape ``[*P]``.

        Args:
            weights: ``[K, N]`` weights (e.g. the signs of residual columns); None for 1.
        """
        g = self.to_dense()
        sq = g * g
        if weights is not None:
            sq = sq * weights.to(sq.dtype).reshape(*weights.shape, *([1] * len(self.shape)))
        return sq.sum((0, 1))


def check_weights(weights: Tensor | None, k: int, n: int) -> None:
    """Raise unless ``weights`` is None or shaped ``[K, N]``."""
    if weights is not None and tuple(weights.shape) != (k, n):
        raise ValueError(f"weights must have shape [K, N] = [{k}, {n}], got {tuple(weights.shape)}")


class ColumnDenseFactor(ColumnFactor):
    """Materialized ``[K, N, *P]`` column gradients (biases, norms, the fallback rule).

    Example:
        >>> import torch
        >>> f = ColumnDenseFactor(torch.ones(3, 2, 5))  # K = 3 columns, N = 2, P = [5]
        >>> f.sum_of_squares()
        tensor([6., 6., 6., 6., 6.])
        >>> f.sum_of_squares(torch.ones(2, 3))
        Traceback (most recent call last):
        ...
        ValueError: weights must have shape [K, N] = [3, 2], got (2, 3)
    """

    def __init__(self, grads: Tensor) -> None:
        self.grads = grads
        self.k, self.n = grads.shape[0], grads.shape[1]
        self.shape = grads.shape[2:]

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.grads

    def sum_of_squares(self, weights: Tensor | None = None) -> Tensor:  # noqa: D102
        check_weights(weights, self.k, self.n)
        return super().sum_of_squares(weights)


class ColumnAffineFactor(ColumnFactor):
    """``G[k, n][g] = Σ_s b[k,n,g,s]ᵀ a[k,n,g,s]`` where either side may be shared by all k.

    Args:
        a: ``[K_a, N, G, S, I]`` with ``K_a ∈ {1, K}`` (1: the same for every column, e.g.
            the layer input, which the columns share).
        b: ``[K_b, N, G, S, O]`` with ``K_b ∈ {1, K}``.
        shape: Parameter shape P with ``prod(P) = G·O·I`` (rows group-major).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> n, i, o = 4, 3, 2  # Linear(3, 2, bias=False) under MSELoss(reduction="sum")
        >>> x, y = torch.randn(n, i, dtype=torch.float64), torch.randn(n, o, dtype=torch.float64)
        >>> # the loss Hessian w.r.t. the output is 2·I: K = O columns √2·e_k, equal for all n
        >>> cols = 2**0.5 * torch.eye(o, dtype=torch.float64)  # [K, O]
        >>> b = cols.view(o, 1, 1, 1, o).expand(o, n, 1, 1, o)  # [K, N, G, S, O]
        >>> f = ColumnAffineFactor(x.view(1, n, 1, 1, i), b, (o, i))  # the input is shared: K_a = 1
        >>> f.k, f.to_dense().shape  # [K, N, *P]
        (2, torch.Size([2, 4, 2, 3]))
        >>> loss = lambda w: ((x @ w.T - y) ** 2).sum()
        >>> hess = torch.autograd.functional.hessian(loss, torch.zeros(o, i, dtype=torch.float64))
        >>> torch.allclose(f.sum_of_squares(), hess.view(o * i, o * i).diagonal().view(o, i))
        True
        >>> s = 3  # with shared positions, signed weights [K, N]
        >>> a2, b2 = torch.randn(1, n, 1, s, i), torch.randn(o, n, 1, s, o)
        >>> f2, w = ColumnAffineFactor(a2, b2, (o, i)), torch.randn(o, n)
        >>> ref = (w[:, :, None, None] * f2.to_dense() ** 2).sum((0, 1))
        >>> torch.allclose(f2.sum_of_squares(w), ref)
        True
    """

    def __init__(self, a: Tensor, b: Tensor, shape: Sequence[int]) -> None:
        if a.dim() != 5 or b.dim() != 5 or a.shape[1:4] != b.shape[1:4]:
            raise ValueError(
                f"ColumnAffineFactor needs a [K,N,G,S,I], b [K,N,G,S,O]; got {a.shape}, {b.shape}"
            )
        ka, kb = a.shape[0], b.shape[0]
        if ka != kb and 1 not in (ka, kb):
            raise ValueError(f"ColumnAffineFactor: column counts {ka} and {kb} differ")
        self.a, self.b = a, b
        self.k = max(ka, kb)
        self.n, self.groups, self.s = a.shape[1], a.shape[2], a.shape[3]
        self.shape = torch.Size(shape)

    @property
    def _dims(self) -> tuple[int, int]:
        return self.b.shape[4], self.a.shape[4]

    def to_dense(self) -> Tensor:  # noqa: D102
        k = self.k
        a = self.a.expand(k, *self.a.shape[1:])
        b = self.b.expand(k, *self.b.shape[1:])
        g = torch.einsum("kngso,kngsi->kngoi", b, a)
        return g.reshape(k, self.n, *self.shape)

    def sum_of_squares(self, weights: Tensor | None = None) -> Tensor:  # noqa: D102
        check_weights(weights, self.k, self.n)
        a, b = self.a, self.b
        w = None if weights is None else weights.to(a.dtype)
        if self.s == 1:
            a2, b2 = a[:, :, :, 0].square(), b[:, :, :, 0].square()  # [K_a,N,G,I], [K_b,N,G,O]
            if a.shape[0] == 1:
                bw = b2 if w is None else b2 * w[:, :, None, None]
                out = torch.einsum("ngo,ngi->goi", bw.sum(0), a2[0])
            elif b.shape[0] == 1:
                aw = a2 if w is None else a2 * w[:, :, None, None]
                out = torch.einsum("ngo,ngi->goi", b2[0], aw.sum(0))
            else:
                bw = b2 if w is None else b2 * w[:, :, None, None]
                out = torch.einsum("kngo,kngi->goi", bw, a2)
            return out.reshape(self.shape)
        return self._materialized_squares(w)

    def _materialized_squares(self, w: Tensor | None) -> Tensor:
        """S > 1: build ``G[k, n]`` chunk by chunk, square, sum.

        On the CPU column by column (:meth:`_squares_by_column`); elsewhere with the
        columns stacked into one matmul per sample (:meth:`_squares_stacked`: fewer,
        larger kernels where each launch costs host time, and the transposing copy it
        needs is cheap at GPU bandwidth; the form the CUDA figures were measured with).
        """
        if self.a.device.type == "cpu":
            return self._squares_by_column(w)
        return self._squares_stacked(w)

    def _squares_by_column(self, w: Tensor | None) -> Tensor:
        """One batched matmul per column and chunk of samples, the shared side read in place.

        Stacking the columns needs ``b`` copied transposed to ``[N, K·O, S]`` first,
        which on the CPU cost more than the larger matmul saved (3C3D's convolutions
        with K = 10: 120/199/156 ms column by column against 190/219/189 stacked).
        """
        a, b = self.a, self.b
        k, n, groups, s = self.k, self.n, self.groups, self.s
        o, i = self._dims
        nc = max(1, min(n, chunk_elements(a.device) // max(1, groups * o * i)))
        total = a.new_zeros(groups, o, i)
        for col in range(k):
            ak, bk = a[min(col, a.shape[0] - 1)], b[min(col, b.shape[0] - 1)]  # [N, G, S, ·]
            for n0 in range(0, n, nc):
                n1 = min(n, n0 + nc)
                m = n1 - n0
                bc = bk[n0:n1].transpose(2, 3).reshape(m * groups, o, s)
                ac = ak[n0:n1].reshape(m * groups, s, i)
                sq = torch.bmm(bc, ac).view(m, groups, o, i).square_()
                if w is not None:
                    sq *= w[col, n0:n1].view(m, 1, 1, 1)
                total += sq.sum(0)
        return total.reshape(self.shape)

    def _squares_stacked(self, w: Tensor | None) -> Tensor:
        """Chunks of columns and samples, the columns stacked into one matmul per sample."""
        a, b = self.a, self.b
        k, n, groups, s = self.k, self.n, self.groups, self.s
        o, i = self._dims
        per = max(1, groups * o * i)
        limit = chunk_elements(a.device)
        kc = max(1, min(k, limit // per))
        nc = max(1, min(n, limit // (per * kc)))
        total = a.new_zeros(groups, o, i)
        for k0 in range(0, k, kc):
            k1 = min(k, k0 + kc)
            for n0 in range(0, n, nc):
                n1 = min(n, n0 + nc)
                m, kk = n1 - n0, k1 - k0
                wc = None if w is None else w[k0:k1, n0:n1].T  # [m, kk]
                if a.shape[0] == 1:
                    # shared inputs: one GEMM per (sample, group) over all columns
                    bc = b[k0:k1, n0:n1].permute(1, 2, 0, 4, 3).reshape(m * groups, kk * o, s)
                    ac = a[0, n0:n1].reshape(m * groups, s, i)
                    sq = torch.bmm(bc, ac).view(m, groups, kk, o, i).square_()
                    if wc is not None:
                        sq *= wc[:, None, :, None, None]
                    total += sq.sum((0, 2))
                elif b.shape[0] == 1:
                    # shared "output" side (transposed convolutions)
                    ac = a[k0:k1, n0:n1].permute(1, 2, 3, 0, 4).reshape(m * groups, s, kk * i)
                    bc = b[0, n0:n1].reshape(m * groups, s, o).transpose(1, 2)
                    sq = torch.bmm(bc, ac).view(m, groups, o, kk, i).square_()
                    if wc is not None:
                        sq *= wc[:, None, None, :, None]
                    total += sq.sum((0, 3))
                else:
                    g = torch.einsum("kngso,kngsi->kngoi", b[k0:k1, n0:n1], a[k0:k1, n0:n1])
                    sq = g.square_()
                    if wc is not None:
                        sq *= wc.T[:, :, None, None, None]
                    total += sq.sum((0, 1))
        return total.reshape(self.shape)


class ColumnEmbeddingFactor(ColumnFactor):
    """Embedding gradients ``G[k, n] = Σ_s e_{idx[n,s]} g[k,n,s]ᵀ`` (indices shared by all k).

    Args:
        idx: Indices ``[N, S]``.
        g: Output gradients ``[K, N, S, E]``.
        num_embeddings: V.
        padding_idx: Index whose row gets no gradient, or None.

    Example:
        >>> import torch
        >>> idx = torch.tensor([[1, 1, 0], [2, 0, 3]])  # [N, S], 0 pads
        >>> g = torch.arange(24.0).view(2, 2, 3, 2)  # K = 2 output gradient columns [K, N, S, E]
        >>> f = ColumnEmbeddingFactor(idx, g, num_embeddings=4, padding_idx=0)
        >>> f.k, f.to_dense().shape  # [K, N, V, E]
        (2, torch.Size([2, 2, 4, 2]))
        >>> torch.equal(f.to_affine().to_dense(), f.to_dense())  # the one-hot form agrees
        True
        >>> w = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
        >>> ref = (w[:, :, None, None] * f.to_dense() ** 2).sum((0, 1))
        >>> torch.allclose(f.sum_of_squares(w), ref)
        True
        >>> f.sum_of_squares()  # [V, E]; the padding row stays zero
        tensor([[  0.,   0.],
                [680., 800.],
                [360., 410.],
                [584., 650.]])
    """

    def __init__(self, idx: Tensor, g: Tensor, num_embeddings: int, padding_idx: int | None):
        self.idx, self.g = idx, g
        self.k, self.n = g.shape[0], idx.shape[0]
        self.num_embeddings = num_embeddings
        self.padding_idx = padding_idx
        self.shape = torch.Size((num_embeddings, g.shape[-1]))

    def _rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """Touched ``(sample, vocab)`` pairs ``[U]``, ``[U]`` and their rows ``[K, U, E]``."""
        n, s = self.idx.shape
        sample = torch.arange(n, device=self.idx.device).repeat_interleave(s)
        vocab = self.idx.reshape(-1)
        g = self.g.reshape(self.k, n * s, -1)
        if self.padding_idx is not None:
            keep = vocab != self.padding_idx
            sample, vocab, g = sample[keep], vocab[keep], g[:, keep]
        key = sample * self.num_embeddings + vocab
        uniq, inverse = torch.unique(key, return_inverse=True)
        rows = g.new_zeros(self.k, uniq.numel(), g.shape[2]).index_add_(1, inverse, g)
        return uniq // self.num_embeddings, uniq % self.num_embeddings, rows

    def to_dense(self) -> Tensor:  # noqa: D102
        sample, vocab, rows = self._rows()
        dense = rows.new_zeros(self.k, self.n, *self.shape)
        dense[:, sample, vocab] = rows
        return dense

    def to_affine(self) -> ColumnAffineFactor:
        """The same gradients in affine form: ``b = onehot(idx)`` (shared), ``a = g``."""
        onehot = torch.nn.functional.one_hot(self.idx, self.num_embeddings).to(self.g.dtype)
        if self.padding_idx is not None:
            onehot[..., self.padding_idx] = 0
        return ColumnAffineFactor(self.g.unsqueeze(2), onehot[None, :, None], self.shape)

    def sum_of_squares(self, weights: Tensor | None = None) -> Tensor:  # noqa: D102
        check_weights(weights, self.k, self.n)
        sample, vocab, rows = self._rows()
        sq = rows.square()
        if weights is not None:
            sq = sq * weights.to(sq.dtype)[:, sample, None]
        return rows.new_zeros(self.shape).index_add_(0, vocab, sq.sum(0))


def combine_columns(factors: Sequence[ColumnFactor]) -> ColumnFactor:
    """Merge the column factors of several uses of one parameter (per-column sums).

    Like :func:`combine`: affine and embedding forms concatenate along S, so the squares
    of the summed gradients are exact; anything else is materialized and added.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> k, n, i, o = 2, 3, 4, 2  # one Linear(4, 2) weight used twice, K = 2 columns
        >>> a1, a2 = torch.randn(1, n, 1, 1, i), torch.randn(1, n, 1, 1, i)  # shared by the columns
        >>> b1, b2 = torch.randn(k, n, 1, 1, o), torch.randn(k, n, 1, 1, o)  # [K, N, G, S, O]
        >>> uses = [ColumnAffineFactor(a1, b1, (o, i)), ColumnAffineFactor(a2, b2, (o, i))]
        >>> merged = combine_columns(uses)
        >>> type(merged).__name__, merged.s  # concatenated along S
        ('ColumnAffineFactor', 2)
        >>> summed = uses[0].to_dense() + uses[1].to_dense()  # [K, N, O, I]
        >>> torch.allclose(merged.sum_of_squares(), (summed**2).sum((0, 1)))  # squares of the sums
        True
        >>> apart = uses[0].sum_of_squares() + uses[1].sum_of_squares()  # misses the cross terms
        >>> torch.allclose(apart, (summed**2).sum((0, 1)))
        False
    """
    if len(factors) == 1:
        return factors[0]
    if len({f.k for f in factors}) != 1:
        raise ValueError("combine_columns: factors have different column counts")
    if all(isinstance(f, ColumnEmbeddingFactor) for f in factors):
        first = factors[0]
        assert isinstance(first, ColumnEmbeddingFactor)
        if all(
            f.num_embeddings == first.num_embeddings and f.padding_idx == first.padding_idx
            for f in factors  # type: ignore[attr-defined]
        ):
            return ColumnEmbeddingFactor(
                torch.cat([f.idx for f in factors], 1),  # type: ignore[attr-defined]
                torch.cat([f.g for f in factors], 2),  # type: ignore[attr-defined]
                first.num_embeddings,
                first.padding_idx,
            )
    if all(isinstance(f, (ColumnAffineFactor, ColumnEmbeddingFactor)) for f in factors):
        affine = [f.to_affine() if isinstance(f, ColumnEmbeddingFactor) else f for f in factors]
        if len({(f.groups, f._dims) for f in affine}) == 1:  # type: ignore[attr-defined]
            k = factors[0].k

            def cat(parts: list[Tensor]) -> Tensor:
                if all(p.shape[0] == 1 for p in parts):
                    return torch.cat(parts, 3)
                return torch.cat([p.expand(k, *p.shape[1:]) for p in parts], 3)

            return ColumnAffineFactor(
                cat([f.a for f in affine]),  # type: ignore[attr-defined]
                cat([f.b for f in affine]),  # type: ignore[attr-defined]
                affine[0].shape,
            )
    total = factors[0].to_dense().clone()
    for f in factors[1:]:
        total += f.to_dense()
    return ColumnDenseFactor(total)
