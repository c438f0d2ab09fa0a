"""Which per-device engine settings are fastest: one process, variants interleaved.

The engine's chunking and its choice of kernel for per-sample convolution gradients
were tuned on the CPU (``factors.CHUNK_ELEMENTS``: 8 MiB blocks, below glibc's
``mmap`` threshold; ``conv.GROUPED_MIN_POSITIONS``; the grouped weight-gradient kernel
also for few-channel input layers). This probe times workload B with each variant of
those settings against a plain step in the same process, so a device's defaults can be
chosen from a measurement rather than carried over from the CPU::

    python -m benchmarks.knob_probe --device cuda [--reps 5] [--out FILE.json]

Each (configuration, variant) gets its own model copy and warm-up; then repetitions
alternate a plain block and a block of that configuration (≥ 0.1 s of plain steps), and
the median ratio is printed (configuration blocks of at most 0.5 s). Variants set
module attributes only for their own blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from benchmarks.workloads import WORKLOADS
from cockpit import Cockpit
from cockpit import factors as _factors
from cockpit.engine import Engine
from cockpit.layers import conv as _conv
from cockpit.quantities import (
    BatchDot,
    BatchL2,
    DiagGGN,
    GradDot,
    Hist1D,
    Hist2D,
    Projection,
    SecondMoment,
)

_GROUPED = _conv.ConvFactor._grouped_kernel


def _grouped_min_channels(self) -> bool:  # the rule before 35491ef: RGB layers unfold
    return _GROUPED(self) and self.shape[1] >= 16


#: name → {(object, attribute): value}
VARIANTS: dict[str, dict[tuple[object, str], object]] = {
    "default": {},
    "big_chunks": {(_factors, "CHUNK_ELEMENTS"): 1 << 26},
    "rgb_unfold": {(_conv.ConvFactor, "_grouped_kernel"): _grouped_min_channels},
    "rgb_unfold+big_chunks": {
        (_conv.ConvFactor, "_grouped_kernel"): _grouped_min_channels,
        (_factors, "CHUNK_ELEMENTS"): 1 << 26,
    },
    "no_grouped": {(_conv, "GROUPED_MIN_POSITIONS"): 1 << 62},
    "no_grouped+big_chunks": {
        (_conv, "GROUPED_MIN_POSITIONS"): 1 << 62,
        (_factors, "CHUNK_ELEMENTS"): 1 << 26,
    },
    "grouped_min_64": {(_conv, "GROUPED_MIN_POSITIONS"): 64},
    "chunks_4mib": {(_factors, "CHUNK_ELEMENTS"): 1 << 20},
    "chunks_8mib": {(_factors, "CHUNK_ELEMENTS"): 1 << 21},
    "chunks_16mib": {(_factors, "CHUNK_ELEMENTS"): 1 << 22},
    "row_chunks_8mib": {(_factors, "ROW_CHUNK_ELEMENTS"): 1 << 21},
    "row_chunks_32mib": {(_factors, "ROW_CHUNK_ELEMENTS"): 1 << 23},
    # alpha's start projections from the kept (x, g) of every layer (one convolution per
    # layer after the update), never from per-sample gradients built for other requests
    "factors_only": {(_factors.AffineFactor, "reduce_and_keep"): _factors.Factor.reduce_and_keep},
}

CONFIGS = {
    "batch_l2": [BatchL2()],
    "second_moment": [SecondMoment()],
    "hist1d": [Hist1D()],
    "hist2d": [Hist2D()],
    "first_order_all": [
        BatchL2(),
        BatchDot(),
        SecondMoment(),
        GradDot(),
        Projection(),
        Hist1D(),
        Hist2D(),
    ],
    "diag_ggn_mc": [DiagGGN(1)],
    "economy": "economy",
}


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Set a variant's attributes for the duration of the block."""
    saved = {key: getattr(*key) for key in VARIANTS[name]}
    try:
        for (obj, attr), value in VARIANTS[name].items():
            setattr(obj, attr, value)
        yield
    finally:
        for (obj, attr), value in saved.items():
            setattr(obj, attr, value)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def steps(
    workload: str, device: str, config: str | None, logdir: str, opened: list
) -> Callable[[], None]:
    """One training step of workload ``workload``: plain (``config`` None) or gathering."""
    w = WORKLOADS[workload]
    model = w.model(device=device)
    x, y = w.data(w.batch_size(), device=device)
    loss_fn = w.loss_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    what = None if config is None else CONFIGS[config]
    if what == "economy":
        cockpit = Cockpit(model, loss_fn, opt, instruments="economy", logdir=logdir)
        opened.append(cockpit)
        count = iter(range(1 << 40))

        def step() -> None:
            i = next(count)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            with cockpit.step(i, loss):
                loss.backward()
            opt.step()

        return step
    engine = Engine(model, loss_fn, fail_mode="error")
    gen = torch.Generator().manual_seed(2)
    dirs = {
        "u": {
            n: torch.randn(p.shape, generator=gen).to(device) for n, p in model.named_parameters()
        }
    }

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if what is None:
            loss.backward()
        else:
            with engine.gather(what, directions=dirs):
                loss.backward()
        opt.step()

    return step


def block(step: Callable[[], None], k: int, device: str) -> float:
    """Seconds per step over ``k`` steps."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(k):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / k


def main(argv: list[str] | None = None) -> int:
    """Time every (configuration, variant) against plain steps; print and save medians."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--workload", default="B")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        opened: list = []
        plain = steps(args.workload, args.device, None, tmp, opened)
        for _ in range(3):
            plain()
        t_plain = block(plain, 5, args.device)
        k = max(3, int(0.1 / t_plain))
        for config in args.configs.split(","):
            # a variant may be listed twice (ABAB orders): each run logs to its own dir
            for i, name in enumerate(args.variants.split(",")):
                with variant(name):
                    step = steps(
                        args.workload, args.device, config, f"{tmp}/{config}-{name}-{i}", opened
                    )
                    for _ in range(2):
                        step()
                    kc = max(2, min(k, int(0.5 / block(step, 1, args.device))))
                ratios, ms = [], []
                for _ in range(args.reps):
                    tp = block(plain, k, args.device)
                    with variant(name):
                        tc = block(step, kc, args.device)
                    ratios.append(tc / tp)
                    ms.append((tp * 1e3, tc * 1e3))
                med = statistics.median(ratios)
                runs = results.setdefault(config, {})
                runs[name if name not in runs else f"{name} ({i})"] = {
                    "ratio_median": med,
                    "ratios": ratios,
                    "ms": ms,
                }
                print(
                    f"{config:16s} {name:22s} {med:6.2f}x ({min(ratios):.2f}–{max(ratios):.2f})"
                    f"  plain {statistics.median(m[0] for m in ms):.2f} ms,"
                    f" config {statistics.median(m[1] for m in ms):.2f} ms",
                    flush=True,
                )
        for cockpit in opened:
            cockpit.close()
    meta = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__,
        "workload": args.workload,
        "reps": args.reps,
        "steps_per_block": k,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
