"""What per-sample quantities cost before any bookkeeping: the kernels alone.

Second moments, histograms and (for layers with many output positions) norms of
per-sample gradients need each sample's weight gradient of every convolution, the
multiply-adds of the layer's forward convolution again, but written out per sample
(``N × D`` numbers) instead of summed over the batch. This probe times, per
convolution of a workload, on the ``(x, δ)`` that one real backward pass produced:

- ``per-sample``: the engine's own kernel for the per-sample weight gradients, in the
  engine's chunks of samples (:class:`cockpit.layers.conv.ConvFactor`), results dropped;
- ``forward``: the layer's forward convolution on the batch (the same multiply-adds);
- ``batch wgrad``: the batch weight gradient, the same multiply-adds summed over samples;
- ``count``: counting the per-sample entries into the default 1D histogram
  (:class:`cockpit.quantities.Hist1D`, the compiled kernel);
- ``count 2D``: the same entries into the default 2D histogram with the weights;
- ``gram``: the ``N × N`` Gram matrix of the built per-sample gradients (one matmul);

for each dense layer (its per-sample gradients are outer products, never built) the
1D and 2D histogram counts from the factors, as the engine computes them; and a plain
fwd+bwd+SGD step of the workload. Output gradients are scaled by N, as the engine
scales them to describe the unscaled per-sample gradients of the mean loss. Every
timing is the median over ``--reps`` repetitions, each after a plain step, so the
allocator is in the state a training step leaves it in. The totals, divided by the
plain step, are the extra ratio those kernels alone add: a lower bound for a
configuration that needs them, with this machine's kernels::

    python -m benchmarks.kernel_floor --workload B [--reps 7] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.harness import Options, _context, plain_step
from benchmarks.workloads import WORKLOADS
from cockpit import factors as _factors
from cockpit.layers.conv import ConvFactor, _conv_padding
from cockpit.quantities import Hist1D, Hist2D


def _median_ms(fn: Callable[[], object], before: Callable[[], None], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _capture(model: nn.Module, step: Callable[[], None]) -> dict[nn.Module, list[Tensor]]:
    """``{conv or linear: [input, output gradient]}`` of one step (hooks removed after)."""
    seen: dict[nn.Module, list[Tensor]] = {}

    def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
        seen[mod] = [inp[0].detach()]
        out.register_hook(lambda g: seen[mod].append(g.detach()))

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [c.register_forward_hook(hook) for c in layers]
    try:
        step()
    finally:
        for h in handles:
            h.remove()
    return {c: seen[c] for c in layers}


def _dense_row(layer: nn.Linear, a: Tensor, b: Tensor, plain, reps: int) -> dict:
    """Histogram counts of a dense layer's per-sample outer products ``b_n a_nᵀ``."""
    w = layer.weight.detach()

    def count() -> None:
        _factors._outer_hist1d(a, b, Hist1D())

    def count_2d() -> None:
        _factors._outer_hist2d(a[:, None], b[:, None], w, Hist2D())

    return {
        "layer": f"{tuple(w.shape)}",
        "entries": a.shape[0] * w.numel(),
        "count": _median_ms(count, plain, reps),
        "count_2d": _median_ms(count_2d, plain, reps),
    }


def _conv_row(conv: nn.Conv2d, inp: Tensor, g: Tensor, plain, reps: int) -> dict:
    """The kernel times of one convolution (see the module docstring)."""
    xp, pad = _conv_padding(conv, inp)
    factor = ConvFactor(xp, g, conv, pad)
    n, numel = inp.shape[0], conv.weight.numel()
    chunk = max(1, _factors.chunk_elements(inp.device) // numel)
    chunk = -(-n // -(-n // chunk))  # as the engine: equal chunks of samples
    w = conv.weight.detach()

    def per_sample() -> None:
        factor.drop_cache()  # the unfolded patches, where used, are part of the work
        for start in range(0, n, chunk):
            factor.to_dense(start, start + chunk)

    def forward() -> None:
        F.conv2d(xp, w, None, conv.stride, pad, conv.dilation, conv.groups)

    def wgrad() -> None:
        torch.ops.aten.convolution_backward(
            g, xp, w, None, conv.stride, pad, conv.dilation, False, [0, 0], conv.groups,
            (False, True, False),
        )  # fmt: skip

    dense = factor.to_dense().reshape(n, -1)
    positions = g.shape[2:].numel()
    return {
        "layer": f"{tuple(w.shape)}, {positions} positions",
        "gflop": 2 * n * positions * numel / 1e9,
        "per_sample": _median_ms(per_sample, plain, reps),
        "forward": _median_ms(forward, plain, reps),
        "batch_wgrad": _median_ms(wgrad, plain, reps),
        "count": _median_ms(lambda: _factors._hist1d(dense, Hist1D()), plain, reps),
        "count_2d": _median_ms(
            lambda: _factors._hist2d(dense, w.reshape(1, -1), Hist2D()), plain, reps
        ),
        "gram": _median_ms(lambda: dense @ dense.T, plain, reps),
    }


def measure(workload: str, reps: int) -> dict:
    """Per-layer kernel times and the plain step of ``workload``, in milliseconds."""
    wl = WORKLOADS[workload]
    torch.manual_seed(0)
    ctx = _context(wl, wl.model(), Options())
    plain = plain_step(ctx)
    model = ctx.model
    for _ in range(3):
        plain()
    captured = _capture(model, plain)
    t_plain = _median_ms(plain, lambda: None, reps)
    rows, dense_rows = [], []
    for layer, (inp, g) in captured.items():
        g = g * inp.shape[0]  # the unscaled per-sample gradients of the mean loss
        if isinstance(layer, nn.Linear):
            dense_rows.append(_dense_row(layer, inp, g, plain, reps))
        else:
            rows.append(_conv_row(layer, inp, g, plain, reps))
    return {
        "workload": workload,
        "n": ctx.n,
        "plain_ms": t_plain,
        "layers": rows,
        "dense": dense_rows,
    }


def render(res: dict) -> str:
    """A Markdown table of :func:`measure`'s result, totals as ratios to the plain step."""
    keys = ["per_sample", "forward", "batch_wgrad", "count", "count_2d", "gram"]
    p = res["plain_ms"]
    out = [
        f"Workload {res['workload']} (N = {res['n']}), plain step {p:.1f} ms; kernel times "
        "in ms (GFLOP/s for the three convolution kernels); totals also as a ratio to the "
        "plain step"
    ]
    if res["layers"]:
        out += [
            "",
            "| convolution | GFLOP | per-sample | forward | batch wgrad | 1D count | 2D count"
            " | Gram |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["layers"]:
            cells = [
                f"{r[k]:.1f} ({r['gflop'] / r[k] * 1e3:.0f})" if i < 3 else f"{r[k]:.1f}"
                for i, k in enumerate(keys)
            ]
            out.append(f"| {r['layer']} | {r['gflop']:.2f} | " + " | ".join(cells) + " |")
        tot = {k: sum(r[k] for r in res["layers"]) for k in keys}
        out.append(
            "| **total** | {:.2f} | ".format(sum(r["gflop"] for r in res["layers"]))
            + " | ".join(f"**{tot[k]:.1f}** (+{tot[k] / p:.2f}x)" for k in keys)
            + " |"
        )
    if res["dense"]:
        out += ["", "| dense layer | entries | 1D count | 2D count |", "|---|---:|---:|---:|"]
        for r in res["dense"]:
            cells = f"{r['entries']:,} | {r['count']:.1f} | {r['count_2d']:.1f}"
            out.append(f"| {r['layer']} | {cells} |")
        t1, t2 = (sum(r[k] for r in res["dense"]) for k in ("count", "count_2d"))
        out.append(
            f"| **total** | | **{t1:.1f}** (+{t1 / p:.2f}x) | **{t2:.1f}** (+{t2 / p:.2f}x) |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Measure one workload's kernels and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="B", choices=list(WORKLOADS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None, help="also write the result as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    res = measure(args.workload, args.reps)
    print(render(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
