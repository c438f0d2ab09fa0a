"""Where a tracked step's time goes: ``torch.profiler`` over a preset on a workload.

``python -m benchmarks.profile_step --workload B --preset economy [--device cuda]``

Prints the plain and tracked step times (median of interleaved blocks, as the
benchmarks measure them, but without their process isolation), the number of aten
ops and host↔device synchronizations per tracked step, and the op tables sorted by
self CPU time and, on CUDA, by self device time. ``--trace FILE`` also writes a
Chrome trace (open in ``chrome://tracing`` or Perfetto). A development tool: the
figures that go into the README come from ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from benchmarks.workloads import get
from cockpit import Cockpit, schedules
from instruments import PRESETS

#: Host-side events that wait for the device.
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")


def main(argv: list[str] | None = None) -> None:
    """Profile one preset (or instrument list) on one workload; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="B")
    p.add_argument("--preset", default="economy", help="preset or comma-separated instruments")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="tracked steps under the profiler")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--trace", default=None, help="write a Chrome trace to this file")
    args = p.parse_args(argv)

    w = get(args.workload)
    dev = torch.device(args.device)
    model = w.model(device=args.device)
    x, y = w.data(w.n, device=args.device)
    loss_fn = w.loss_fn()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    instruments = args.preset if args.preset in PRESETS else args.preset.split(",")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def plain() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cockpit = Cockpit(
            model, loss_fn, opt, instruments=instruments, logdir=logdir, schedule=schedules.every(1)
        )
        step = [0]

        def tracked() -> None:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            with cockpit.step(step[0], loss):
                loss.backward()
            opt.step()
            step[0] += 1

        def block(fn, k: int) -> float:
            sync()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            sync()
            return (time.perf_counter() - t0) / k

        for _ in range(3):
            plain()
            tracked()
        k_plain = max(1, int(0.2 / max(block(plain, 1), 1e-5)))
        k_tracked = max(1, int(0.2 / max(block(tracked, 1), 1e-5)))
        times_p, times_t = [], []
        for _ in range(5):
            times_p.append(block(plain, k_plain))
            times_t.append(block(tracked, k_tracked))
        tp, tt = statistics.median(times_p), statistics.median(times_t)
        print(
            f"{w.name} N={w.n} on {dev}: plain {tp * 1e3:.2f} ms, tracked "
            f"({args.preset}) {tt * 1e3:.2f} ms, ratio {tt / tp:.2f}x"
        )

        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        sync()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                tracked()
            sync()
        cockpit.close()

    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"aten ops per tracked step: {aten / args.steps:.0f}")
    for name in SYNC_EVENTS:
        count = sum(e.count for e in events if e.key == name)
        if count:
            print(f"{name} per tracked step: {count / args.steps:.1f}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if dev.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
