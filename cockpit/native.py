"""Compiled histogram kernels for the CPU, built on first use with the system C compiler.

Histograms of individual gradients touch every one of the N·D entries of a layer.
The torch path (:func:`cockpit.factors.uniform_counts`) bins them in five
elementwise passes and counts the index array with ``bincount``; the kernels in
``_hist.c`` do both in one pass per entry, without an index array, and count the
2D histogram of a Linear layer's outer products ``b_n a_nᵀ`` without building them.
They bin op for op as the torch path does (same float ops in the value's precision),
so both give the same counts; ``tests/cockpit/test_native.py`` checks that on edges,
NaN, infinities and outliers.

The shared library is compiled once per source, compiler and machine into
``$COCKPIT_CACHE_DIR`` (default ``~/.cache/cockpit-live``) with ``$CC`` (default
``cc``), in well under a second. Where that fails (no compiler, a read-only cache),
one :class:`RuntimeWarning` says why and the torch path is used: same counts, slower.
``COCKPIT_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from cockpit.checks import all_finite

__all__ = [
    "available",
    "bin_grid",
    "count1d",
    "count2d",
    "library",
    "outer1d",
    "outer2d",
]

SOURCE = Path(__file__).with_name("_hist.c")
#: Exactness needs every product and sum rounded on its own: no fused multiply-add.
FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
#: Below this many entries a kernel runs on one thread.
PARALLEL_MIN = 1 << 18

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def _cpu_key() -> str:
    """What the compiled code may depend on: architecture and (Linux) the CPU's flags."""
    key = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    key += line
                    break
    except OSError:
        pass
    return key


def _arch_flags() -> list[str]:
    # built on (and keyed to) the machine that runs it: its own vector instructions
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or "cc"
    compiler = shutil.which(cc)
    if compiler is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set $CC or install gcc)")
    try:  # threads from torch's own OpenMP runtime (see _run), else one thread
        return _build_with(compiler, FLAGS + _arch_flags() + ["-fopenmp"])
    except RuntimeError:
        return _build_with(compiler, FLAGS + _arch_flags())


def _build_with(compiler: str, flags: list[str]) -> ctypes.CDLL:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(flags).encode()):
        digest.update(part)
    digest.update(_cpu_key().encode())
    cache = Path(os.environ.get("COCKPIT_CACHE_DIR") or Path.home() / ".cache" / "cockpit-live")
    lib = cache / f"hist-{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            run = subprocess.run(
                [compiler, *flags, "-o", tmp, str(SOURCE), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if run.returncode != 0:
                raise RuntimeError(f"{compiler} failed on {SOURCE}:\n{run.stderr.strip()}")
            os.replace(tmp, lib)  # atomic: concurrent builders never load half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = ctypes.CDLL(str(lib))
    i64, f64, ptr, i32 = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    for t in ("float", "double"):
        fn = getattr(dll, f"cockpit_count1d_{t}")
        fn.argtypes = [ptr, i64, f64, f64, f64, f64, i64, i64, ptr, i32]
        fn = getattr(dll, f"cockpit_count2d_{t}")
        fn.argtypes = [ptr, i64, i64, i64, ptr, f64, f64, f64, f64, i64, i64, i64, ptr, i32]
        fn = getattr(dll, f"cockpit_outer2d_{t}")
        fn.argtypes = [ptr, ptr, i64, i64, i64, ptr, f64, f64, f64, f64, i64, i64, i64, ptr, i32]
        fn = getattr(dll, f"cockpit_outer1d_{t}")
        fn.argtypes = [ptr, ptr, i64, i64, i64, f64, f64, f64, f64, i64, i64, ptr, i32]
        for kind in ("count1d", "count2d", "outer1d", "outer2d"):
            getattr(dll, f"cockpit_{kind}_{t}").restype = ctypes.c_int
    return dll


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call; ``None`` where they cannot be.

    The first call that cannot build them warns once (:class:`RuntimeWarning`) with
    the reason; ``COCKPIT_NATIVE=0`` turns them off without a warning.

    Example:
        >>> lib = library()  # a ctypes.CDLL, or None without a C compiler
        >>> lib is None or hasattr(lib, "cockpit_count1d_float")
        True
    """
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("COCKPIT_NATIVE", "1") not in ("0", "false", "no", "off"):
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                    warnings.warn(
                        "cockpit: the compiled histogram kernels could not be built, so "
                        "histograms use the slower torch path (same counts): "
                        f"{err}. Install a C compiler (e.g. gcc) or set COCKPIT_NATIVE=0 "
                        "to silence this.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _tried = True
    return _lib


def bin_grid(low: float, high: float, bins: int) -> tuple[float, float, int]:
    """``(k, frac, ioff)`` with ``bin(x) = floor(x·k + frac) + ioff`` (before clamping).

    Writing the affine map as a product plus an integer offset keeps the sign of
    tiny values when 0 is an edge (``frac = 0``): ``(x − low)·k`` would round
    ``x = −1e−9`` up onto the edge at 0 and count it one bin too high. Both the
    kernels and the torch path (:func:`cockpit.factors.uniform_counts`) bin with it.

    Example:
        >>> bin_grid(-2.0, 2.0, 100)  # bin(x) = floor(25·x) + 50
        (25.0, 0.0, 50)
        >>> bin_grid(0.5, 3.0, 5)  # bin(x) = floor(2·x + 0) − 1
        (2.0, 0.0, -1)
    """
    k = bins / (high - low)
    off = -low * k
    ioff = math.floor(off)
    frac = off - ioff
    if frac > 1.0 - 1e-12:  # ``off`` is an integer up to rounding
        ioff, frac = ioff + 1, 0.0
    elif frac < 1e-12:
        frac = 0.0
    return k, frac, ioff


def available(*tensors: Tensor) -> bool:
    """Whether the kernels can count these tensors: CPU, float32 or float64, and built.

    Example:
        >>> import torch
        >>> available(torch.zeros(3)) == (library() is not None)
        True
        >>> available(torch.zeros(3, dtype=torch.float16)), available(torch.zeros(3, dtype=int))
        (False, False)
    """
    return (
        all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
        and len({t.dtype for t in tensors}) <= 1
        and library() is not None
    )


def _threads(work: int) -> int:
    return 1 if work < PARALLEL_MIN else max(1, torch.get_num_threads())


def _run(call, size: int, threads: int) -> Tensor:
    """``call(counts_ptr, threads)``: int64 counts ``[size]``.

    The kernels split their work over OpenMP threads. Built with ``-fopenmp``, the
    library uses the ``libgomp`` that torch has already loaded, so the kernels run on
    torch's own worker threads. Python threads were measured to lose the second core
    to those workers, which keep spinning after each torch op: the 2D count of A's
    first layer took 9.4 ms on two threads against 9.4 on one, and 4.9 ms with
    ``OMP_WAIT_POLICY=PASSIVE``.
    """
    counts = torch.zeros(size, dtype=torch.int64)
    if call(counts.data_ptr(), threads):
        raise MemoryError("cockpit: a histogram kernel could not allocate its counts")
    return counts


def _kernel(kind: str, x: Tensor):
    lib = library()
    if lib is None:
        raise RuntimeError("cockpit: the compiled histogram kernels are not available")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"cockpit: the kernels count CPU float32/float64, not {x.dtype} on {x.device}"
        )
    return getattr(lib, f"cockpit_{kind}_{'float' if x.dtype == torch.float32 else 'double'}")


def _param_bins(pbin: Tensor, columns: int, bp: int, kernel: str) -> Tensor:
    """``pbin`` as contiguous int32, checked: the kernels index their counts with it."""
    if pbin.numel() != columns:
        raise ValueError(f"cockpit.native.{kernel}: pbin has {pbin.numel()} entries, not {columns}")
    if columns and not (0 <= int(pbin.min()) and int(pbin.max()) < bp):
        raise ValueError(f"cockpit.native.{kernel}: parameter bins must lie in 0 … {bp - 1}")
    return pbin.reshape(-1).to(torch.int32).contiguous()


def _grid(low: float, high: float, bins: int) -> tuple[float, float, float, float, int]:
    """Arguments of the kernels: ``k, frac``, the clamp bounds ``lo, hi`` and ``ioff``."""
    if not (math.isfinite(low) and math.isfinite(high) and low < high and bins >= 1):
        raise ValueError(f"cockpit.native: bad bins {bins} on [{low}, {high})")
    k, frac, ioff = bin_grid(low, high, bins)
    return k, frac, float(-ioff), float(bins - 1 - ioff), ioff


def count1d(x: Tensor, low: float, high: float, bins: int) -> Tensor:
    """Counts of the bins of all entries of ``x``: ``[bins + 1]`` int64, the last NaN.

    Bins as :func:`cockpit.factors.bin_index` (equal bins on ``[low, high)``, outliers
    clamped into the edge bins), in ``x``'s own precision.

    Example:
        >>> import torch
        >>> x = torch.tensor([-3.0, -0.5, 0.0, 0.25, float("nan"), float("inf")])
        >>> count1d(x, -1.0, 1.0, 4)  # bins [-1, -0.5), …, [0.5, 1), then NaN
        tensor([1, 1, 2, 1, 1])
    """
    fn = _kernel("count1d", x)
    flat = x.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    call = partial(fn, flat.data_ptr(), n, *_grid(low, high, bins), bins + 1)
    return _run(call, bins + 1, _threads(n))


def count2d(g: Tensor, pbin: Tensor, low: float, high: float, bins: int, bp: int) -> Tensor:
    """Counts of the pairs ``(bin(g[r, c]), pbin[c])`` of ``g`` ``[R, C]``: ``[(bins + 1)·bp]``.

    Entry ``gradient bin · bp + pbin``; ``pbin`` ``[C]`` holds the parameter bins
    (``0 … bp − 1``), the gradient bins are those of :func:`count1d`, NaN in the
    last (``bins``). Rows may be strided.

    Example:
        >>> import torch
        >>> g = torch.tensor([[-0.9, 0.2, 0.7], [0.1, float("nan"), -2.0]])  # N = 2, D = 3
        >>> pbin = torch.tensor([0, 1, 1])  # the bin of θ_j on the parameter axis
        >>> count2d(g, pbin, -1.0, 1.0, 2, bp=2).view(3, 2)  # [gradient bin, θ bin]
        tensor([[1, 1],
                [1, 2],
                [0, 1]])
    """
    fn = _kernel("count2d", g)
    g = g.detach()
    if g.stride(1) != 1:
        g = g.contiguous()
    pbin = _param_bins(pbin, g.shape[1], bp, "count2d")
    rows, cols = g.shape
    grid = _grid(low, high, bins)
    call = partial(fn, g.data_ptr(), rows, cols, g.stride(0), pbin.data_ptr(), *grid, bins, bp)
    return _run(call, (bins + 1) * bp, _threads(rows * cols))


def outer1d(sorted_a: Tensor, b: Tensor, low: float, high: float, bins: int) -> Tensor:
    """:func:`count1d` of the entries ``b[r, o] · a[r, i]`` from ``a``'s rows sorted ascending.

    ``sorted_a`` ``[R, I]`` (each row ascending), ``b`` ``[R, O]``, both finite. The
    bins of row ``(r, o)``'s entries are monotone along the sorted ``a[r]`` (each
    step of the binning is monotone, rounding included), so each run of one bin is
    found by a search that bins its probes exactly as :func:`count1d` bins an entry:
    the same counts as building and binning the ``R·O·I`` entries, at the cost of a
    few searches per row. The order of ``b``'s rows does not change the counts; sorted
    ascending (as :func:`cockpit.factors._outer_hist1d` passes them), consecutive rows
    end their bin runs near each other, and each search starts from there.

    Example:
        >>> import torch
        >>> a = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])  # sorted
        >>> b = torch.tensor([[0.5, -1.0]])  # entries −0.5, 0, 0.25, 1 and 1, −0, −0.5, −2
        >>> outer1d(a, b, -1.0, 1.0, 4)  # bins [-1, -0.5), …, [0.5, 1) (clamped), NaN
        tensor([1, 2, 3, 2, 0])
    """
    fn = _kernel("outer1d", sorted_a)
    a, b = sorted_a.detach().contiguous(), b.detach().to(sorted_a.dtype).contiguous()
    if a.shape[0] != b.shape[0] or not all_finite((a, b)):
        raise ValueError("cockpit.native.outer1d: needs finite a [R, I] and b [R, O]")
    rows, i_ = a.shape
    o_ = b.shape[1]
    call = partial(fn, a.data_ptr(), b.data_ptr(), rows, i_, o_, *_grid(low, high, bins), bins + 1)
    return _run(call, bins + 1, _threads(rows * o_ * 64))  # a few searches a row


def outer2d(
    a: Tensor, b: Tensor, pbin: Tensor, low: float, high: float, bins: int, bp: int
) -> Tensor:
    """:func:`count2d` of the entries ``b[r, o] · a[r, i]`` (column ``o·I + i``), never built.

    ``a`` ``[R, I]``, ``b`` ``[R, O]``, ``pbin`` ``[O·I]``. Each product is rounded to
    the inputs' precision before it is binned, as building ``b[:, :, None] *
    a[:, None, :]`` would.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.25, 0.5]])  # R = 1, I = O = 2
        >>> pbin = torch.tensor([0, 0, 1, 1])  # entries (o, i): 0.25, −0.5, 0.5, −1
        >>> outer2d(a, b, pbin, -1.0, 1.0, 2, bp=2).view(3, 2)
        tensor([[1, 1],
                [1, 1],
                [0, 0]])
    """
    fn = _kernel("outer2d", a)
    a, b = a.detach().contiguous(), b.detach().to(a.dtype).contiguous()
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"cockpit.native.outer2d: a has {a.shape[0]} rows, b {b.shape[0]}")
    pbin = _param_bins(pbin, a.shape[1] * b.shape[1], bp, "outer2d")
    rows, i_ = a.shape
    o_ = b.shape[1]
    grid = _grid(low, high, bins)
    call = partial(fn, a.data_ptr(), b.data_ptr(), rows, i_, o_, pbin.data_ptr(), *grid, bins, bp)
    return _run(call, (bins + 1) * bp, _threads(rows * i_ * o_))
