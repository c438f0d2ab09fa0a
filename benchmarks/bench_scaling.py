"""Scaling study: how the economy preset's cost grows with batch size and model width.

Two configurations of :mod:`benchmarks.bench_presets`, ``ours_economy`` (our public
``Cockpit``, temporary logdir, writer included) and ``ref_economy`` (Cockpit 1.0.2's
``configuration("economy")``), measured with the same harness (interleaved with a plain
step in the same process, median and range over the repetitions, memory in a fresh
process under the per-process cap) on

- **batch size**: workloads A (MLP 784-128-10) and B (3C3D) with N in :data:`SIZES`
  (``--workloads A,B,C`` adds All-CNN-C, whose large N may exceed the memory cap);
- **width**: the MLP 784-w-10 with w in :data:`WIDTHS` at N = 128.

``python -m benchmarks scaling`` writes ``results/scaling.{json,md}``; ``--sizes`` and
``--widths`` override the axes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from benchmarks.bench_presets import (
    RESULTS,
    absolute_table,
    entry,
    mem_cell,
    prepare_options,
    resolve_workload,
    run_ours,
    run_reference,
)
from benchmarks.harness import Options, fmt_ratio

SIZES = (16, 32, 64, 128, 256, 512)
WIDTHS = (32, 64, 128, 256, 512, 1024, 2048)
WIDTH_N = 128
QUICK_SIZES = (8, 16, 32)
QUICK_WIDTHS = (32, 128, 512)
QUICK_WIDTH_N = 16
CONFIG_NAMES = ("ours_economy", "ref_economy")
BATCH_WORKLOADS = ("A", "B")


def axes(
    quick: bool,
    workloads: Sequence[str] = BATCH_WORKLOADS,
    sizes: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
) -> dict:
    """Workload keys of both axes: ``{"batch": {w: [keys]}, "width": [keys]}``."""
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    widths = widths or (QUICK_WIDTHS if quick else WIDTHS)
    n = QUICK_WIDTH_N if quick else WIDTH_N
    return {
        "batch": {w: [f"{w}@n={s}" for s in sizes] for w in workloads},
        "width": [f"A@w={width},n={n}" for width in widths],
    }


def run(
    opts: Options,
    workloads: Iterable[str] = BATCH_WORKLOADS,
    names: Iterable[str] | None = None,
    out_dir: Path = RESULTS,
    log: Callable[[str], None] = print,
    sizes: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
) -> dict:
    """Run the scaling study; write ``scaling.json`` and ``scaling.md`` in ``out_dir``."""
    chosen = list(names or CONFIG_NAMES)
    bad = [n for n in chosen if n not in CONFIG_NAMES]
    if bad:
        raise ValueError(f"unknown configurations {bad}; the scaling study has {CONFIG_NAMES}")
    ax = axes(opts.quick, list(workloads), sizes, widths)
    keys = [k for ks in ax["batch"].values() for k in ks] + ax["width"]
    for k in keys:
        resolve_workload(k)  # fail early on a bad axis
    opts = prepare_options(opts, ["ours_economy", "ref_economy"])
    if opts.quick:
        opts.memory = False
    log(
        f"scaling study: {chosen} on {len(keys)} workloads "
        f"({'quick' if opts.quick else 'full'}, {opts.reps} reps)"
    )
    t0 = time.perf_counter()
    ours = run_ours([n for n in chosen if n.startswith("ours_")], keys, opts, log)
    ref = run_reference([n for n in chosen if n.startswith("ref_")], keys, opts, log)
    result = {
        "meta": {"quick": opts.quick, "axes": ax, "seconds": time.perf_counter() - t0},
        "ours": ours,
        "reference": ref,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scaling.json"
    path.write_text(json.dumps(result, indent=1))
    (out_dir / "scaling.md").write_text(render_markdown(result))
    log(f"wrote {path} and {out_dir / 'scaling.md'}")
    return result


def _plain_ms(suites: list[dict], key: str) -> str:
    for s in suites:
        for name in ("ours_economy", "ref_economy"):
            e = entry(s, name, key)
            if e and e.get("status") == "ok":
                return f"{e['plain_ms']:.1f}"
    return "—"


def _cell(suite: dict, name: str, key: str) -> str:
    e = entry(suite, name, key)
    return fmt_ratio(e) if e else "—"


def render_markdown(result: dict) -> str:
    """Tables of ratio (and memory) against N and width, ours beside Cockpit 1.0.2."""
    ours, ref = result.get("ours") or {}, result.get("reference") or {}
    meta = result["meta"]
    ax = meta["axes"]
    any_meta = ours.get("meta") or ref.get("meta") or {}
    reps = any_meta.get("options", {}).get("reps")
    lines = [
        "# Scaling: economy preset vs batch size and width",
        "",
        "Step time with the economy preset (every step tracked) divided by a plain step, "
        f"interleaved in the same process: median (min–max over {reps} repetitions). "
        + (
            "**Quick smoke test**: not a result."
            if meta.get("quick")
            else "Each cell timed in its own process."
        )
        + " Ours: public `Cockpit(..., instruments='economy', logdir=<temporary directory>)` "
        "(log writer included); Cockpit 1.0.2: `configuration('economy')` in its documented "
        "loop. Generated by `python -m benchmarks scaling`; do not edit by hand.",
        "",
        f"- machine: {any_meta.get('cpu_model', '?')}, {any_meta.get('cpu_count')} CPUs, "
        f"`torch.set_num_threads({any_meta.get('num_threads')})`, torch {any_meta.get('torch')}, "
        f"device {any_meta.get('device')}; date {any_meta.get('date')}",
    ]
    if ours.get("meta"):
        lines.append(
            f"- ours measured at commit {ours['meta'].get('git_commit')} "
            f"({ours['meta'].get('source')}); load average "
            f"{_load(ours['meta'].get('loadavg_start'))} → {_load(ours['meta'].get('loadavg_end'))}"
        )
    if ref.get("meta"):
        lines.append(
            "- Cockpit 1.0.2 load average "
            f"{_load(ref['meta'].get('loadavg_start'))} → {_load(ref['meta'].get('loadavg_end'))}"
        )
    suites = [ours, ref]
    for w, keys in ax["batch"].items():
        name = resolve_workload(w).name
        lines += [
            "",
            f"## Batch size: {w} = {name}",
            "",
            "| N | plain ms | ours | Cockpit 1.0.2 | ours memory | Cockpit memory |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for k in keys:
            n = resolve_workload(k).n
            lines.append(
                f"| {n} | {_plain_ms(suites, k)} | {_cell(ours, 'ours_economy', k)} | "
                f"{_cell(ref, 'ref_economy', k)} | {mem_cell(entry(ours, 'ours_economy', k))} | "
                f"{mem_cell(entry(ref, 'ref_economy', k))} |"
            )
    if ax["width"]:
        n = resolve_workload(ax["width"][0]).n
        lines += [
            "",
            f"## Width: MLP 784-w-10, N = {n}",
            "",
            "| w | parameters | plain ms | ours | Cockpit 1.0.2 | ours memory | Cockpit memory |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k in ax["width"]:
            model = resolve_workload(k).build()
            params = sum(p.numel() for p in model.parameters())
            width = model[0].out_features
            lines.append(
                f"| {width} | {params:,} | {_plain_ms(suites, k)} | "
                f"{_cell(ours, 'ours_economy', k)} | {_cell(ref, 'ref_economy', k)} | "
                f"{mem_cell(entry(ours, 'ours_economy', k))} | "
                f"{mem_cell(entry(ref, 'ref_economy', k))} |"
            )
    keys = [k for ks in ax["batch"].values() for k in ks] + ax["width"]
    lines += ["", "## Absolute step times", "", *absolute_table(suites, keys)]
    return "\n".join(lines) + "\n"


def _load(v) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"
