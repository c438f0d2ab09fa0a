"""``python -m benchmarks [engine|reference|all] [--quick] [--device cpu|cuda]``.

- ``engine``: our engine's configurations and the torch.func baseline on workloads A/B/C;
  writes ``benchmarks/results/engine.json`` and ``engine.md``.
- ``reference``: BackPACK and Opacus in ``.bench-venv`` (built on first use, see
  :mod:`benchmarks.reference_env`); writes ``reference.json`` / ``reference.md`` and
  re-renders ``engine.md`` with the measured references beside ours.
- ``all``: both.
- ``curvature``: diagonal GGN (exact, Monte-Carlo), diagonal Hessian, Hutchinson trace,
  Lanczos max eigenvalue and everything together, ours beside BackPACK's curvature
  extensions (:mod:`benchmarks.bench_curvature`); writes ``curvature.json`` / ``curvature.md``.
- ``presets``: our ``economy``/``business``/``full`` presets through the public
  ``Cockpit`` API beside Cockpit 1.0.2's presets and each of its instruments alone
  (:mod:`benchmarks.bench_presets`); writes ``presets.json`` / ``presets.md``.
- ``scaling``: the economy preset (ours and Cockpit 1.0.2's) against batch size and MLP
  width (:mod:`benchmarks.bench_scaling`); writes ``scaling.json`` / ``scaling.md``.
- ``readme``: re-render the README's benchmark tables from ``benchmarks/results``
  (:mod:`benchmarks.readme`); every target that writes there does this at its end.
- ``crosscheck``: the numerical cross-check against Cockpit 1.0.2
  (``benchmarks/test_crosscheck.py``, run with pytest; skips without ``.bench-venv``).

``--quick`` is a smoke test (small N, 3 repetitions, one timing process, memory only
for the plain step and all first-order quantities on B); its results go to a temporary
directory unless ``--out`` is given, so the committed results are never overwritten
by smoke-test numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Options
from benchmarks.workloads import WORKLOADS

RESULTS = Path(__file__).resolve().parent / "results"


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "target",
        nargs="?",
        default="engine",
        choices=[
            "engine",
            "reference",
            "all",
            "presets",
            "scaling",
            "crosscheck",
            "curvature",
            "readme",
        ],
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: small N, few reps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default 10; quick 3)")
    parser.add_argument("--workloads", help="comma-separated subset of A,B,C")
    parser.add_argument(
        "--configs", help="comma-separated configuration names (merged into existing results)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--mem-cap-gib", type=float, help="per-process memory cap (default 8)")
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="time everything in one process per suite (GPU leases: CUDA start-up costs "
        "seconds per process); memory only on CUDA, in one more process",
    )
    parser.add_argument(
        "--min-block-s", type=float, help="target duration of one timed plain block (default 0.5)"
    )
    parser.add_argument(
        "--max-block-s", type=float, help="cap on one configuration's timed block (default 5)"
    )
    parser.add_argument("--sizes", help="scaling: comma-separated batch sizes (default 16..512)")
    parser.add_argument("--widths", help="scaling: comma-separated MLP widths (default 32..2048)")
    args = parser.parse_args(argv)

    if args.target == "readme":
        from benchmarks import bench_cuda

        bench_cuda.write_markdown(  # the CUDA table also shows the CPU ratios beside it
            (args.out or RESULTS) / "cuda", (args.out or RESULTS) / "cuda.md"
        )
        _sync_readme(args.out or RESULTS, always=True)
        return 0

    if args.target == "crosscheck":
        import subprocess

        test = Path(__file__).resolve().parent / "test_crosscheck.py"
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(test)]
        return subprocess.run(cmd, cwd=test.parent.parent).returncode

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
    opts = Options.for_mode(
        args.quick,
        device=args.device,
        reps=args.reps,
        mem_cap_gib=args.mem_cap_gib,
        memory=False if args.no_memory else None,
        one_process=args.one_process or None,
        min_block_s=args.min_block_s,
        max_block_s=args.max_block_s,
    )
    default_workloads = ["A", "B"] if args.target == "scaling" else list(WORKLOADS)
    workloads = _csv(args.workloads) or default_workloads
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose from {sorted(WORKLOADS)}")
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="cockpit-bench-quick-")) if args.quick else RESULTS
    )
    names = _csv(args.configs)
    t0 = time.perf_counter()
    if args.target in ("engine", "all"):
        from benchmarks import bench_engine

        bad = [n for n in names or () if n not in bench_engine.CONFIGS]
        if bad and args.target == "engine":
            parser.error(f"unknown configurations {bad}; known: {sorted(bench_engine.CONFIGS)}")
        chosen = [n for n in names if n in bench_engine.CONFIGS] if names else None
        if not names or chosen:
            bench_engine.run(opts, workloads, chosen, out)
    if args.target in ("reference", "all"):
        from benchmarks import bench_reference

        chosen = [n for n in names if n in bench_reference.CONFIGS] if names else None
        if names and not chosen and args.target == "reference":
            parser.error(
                f"unknown configurations {names}; known: {sorted(bench_reference.CONFIGS)}"
            )
        if not names or chosen:
            bench_reference.run(opts, workloads, chosen, out)
    if args.target == "presets":
        from benchmarks import bench_presets

        bad = [n for n in names or () if n not in bench_presets.CONFIGS]
        if bad:
            parser.error(f"unknown configurations {bad}; known: {sorted(bench_presets.CONFIGS)}")
        bench_presets.run(opts, workloads, names, out)
        print("\n" + (out / "presets.md").read_text())
    if args.target == "scaling":
        from benchmarks import bench_scaling

        sizes = [int(v) for v in _csv(args.sizes) or ()] or None
        widths = [int(v) for v in _csv(args.widths) or ()] or None
        try:
            bench_scaling.run(opts, workloads, names, out, sizes=sizes, widths=widths)
        except ValueError as err:
            parser.error(str(err))
        print("\n" + (out / "scaling.md").read_text())
    if args.target == "curvature":
        from benchmarks import bench_curvature

        bad = [n for n in names or () if n not in bench_curvature.CONFIGS]
        if bad:
            parser.error(f"unknown configurations {bad}; known: {sorted(bench_curvature.CONFIGS)}")
        bench_curvature.run(opts, workloads, names, out)
        print("\n" + (out / "curvature.md").read_text())
        print(f"done in {time.perf_counter() - t0:.0f} s; results in {out}")
        _sync_readme(out)
        return 0
    for md in ("engine.md", "reference.md"):
        if args.target in ("presets", "scaling"):
            break
        if (out / md).exists() and (args.target != "engine" or md == "engine.md"):
            print("\n" + (out / md).read_text())
    print(f"done in {time.perf_counter() - t0:.0f} s; results in {out}")
    _sync_readme(out)
    return 0


def _sync_readme(out: Path, always: bool = False) -> None:
    """Re-render the README's benchmark blocks from ``out`` (results written there).

    Runs after a benchmark only when it wrote to ``benchmarks/results`` (never for
    ``--quick`` or another ``--out``); ``python -m benchmarks readme`` always.
    """
    if not always and out.resolve() != RESULTS.resolve():
        return
    from benchmarks.readme import README, update_readme

    changed = update_readme(README, out)
    print(f"README: {'updated ' + ', '.join(changed) if changed else 'tables already current'}")


if __name__ == "__main__":
    sys.exit(main())
