"""Curvature benchmark: diagonal GGN / Hessian, Hutchinson trace and Lanczos vs a plain step.

``python -m benchmarks curvature`` measures, with the harness of :mod:`benchmarks.harness`
(same process, interleaved with the plain step, median and min–max of the repetitions,
memory in a fresh process, a memory cap per process), on workloads A/B/C:

- ours (:class:`cockpit.engine.Engine`, gathered in the training step's one
  ``loss.backward()``): exact :class:`~cockpit.quantities.DiagGGN`, Monte-Carlo
  ``DiagGGN(mc_samples=1)``, :class:`~cockpit.quantities.DiagHessian`; the Hutchinson
  trace (:func:`cockpit.linops.hutchinson_trace`, :data:`HUTCHINSON_PROBES` probes) and
  the largest-magnitude eigenvalue (:func:`cockpit.linops.lanczos`, ``tol`` 1e-3, cap 100,
  cold and warm-started like the ``hess_max_ev`` instrument) on
  :meth:`~cockpit.engine.Engine.hessian_operator`, after the backward pass, before
  ``optimizer.step()``; and ``everything`` (all of these plus all first-order quantities);
- BackPACK 1.7.1 ``DiagGGNExact``, ``DiagGGNMC``, ``DiagHessian`` in ``.bench-venv``
  (:func:`benchmarks.bench_reference.backpack_config`).

Writes ``results/curvature.json`` and ``results/curvature.md`` (with the targets of issue
#4 and BackPACK's earlier ratios beside ours). Lanczos steps report their number of
Hessian-vector products through the harness's ``step.stats()``.

This module imports only torch, the standard library and the torch-only benchmark
modules at import time: the BackPACK workers run it in ``.bench-venv`` from a temporary
copy (our ``cockpit`` is imported inside our configurations' set-up only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from benchmarks.bench_reference import _REPO_ENV, WORKER_FILES, _guard, backpack_config
from benchmarks.harness import (
    PLAIN,
    Config,
    Context,
    Launcher,
    Options,
    StepFn,
    fmt_ratio,
    plain_mem_text,
    run_suite,
    worker_cli,
)
from benchmarks.workloads import WORKLOADS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: Rademacher probes of the Hutchinson trace row (one batched call of K products).
HUTCHINSON_PROBES = 16
#: Lanczos settings of the max-eigenvalue rows (the ``hess_max_ev`` instrument's defaults).
LANCZOS_TOL = 1e-3
LANCZOS_MAX_ITER = 100


def curvature_config(
    name: str,
    label: str,
    quantities: Sequence[str] = (),
    *,
    first_order: bool = False,
    trace_probes: int = 0,
    lanczos: str | None = None,
    note: str = "",
) -> Config:
    """Our engine gathering curvature (and more) in every step.

    Args:
        name: Result key.
        label: Table label.
        quantities: Curvature keys gathered in the backward pass: ``"diag_ggn"``
            (``DiagGGN()``), ``"diag_ggn_mc"`` (``DiagGGN(mc_samples=1)``),
            ``"diag_hessian"`` (``DiagHessian()``).
        first_order: Also gather all first-order quantities of ``first_order_all`` in
            :mod:`benchmarks.bench_engine` (and form the variance).
        trace_probes: If > 0, a Hutchinson trace with this many probes on
            ``engine.hessian_operator()`` after the backward pass.
        lanczos: ``"cold"`` (random start every step) or ``"warm"`` (started from the
            previous step's eigenvector, as the ``hess_max_ev`` instrument does): the
            largest-magnitude eigenvalue by Lanczos after the backward pass.
        note: Table footnote.
    """
    if lanczos not in (None, "cold", "warm"):
        raise ValueError(f"lanczos must be None, 'cold' or 'warm', got {lanczos!r}")

    def setup(ctx: Context) -> StepFn:
        from cockpit.engine import Engine
        from cockpit.linops import hutchinson_trace
        from cockpit.linops import lanczos as lanczos_fn
        from cockpit.quantities import DiagGGN, DiagHessian

        keys = {"diag_ggn": DiagGGN(), "diag_ggn_mc": DiagGGN(1), "diag_hessian": DiagHessian()}
        qs = [keys[q] for q in quantities]
        directions, post = None, None
        if first_order:
            from benchmarks import bench_engine

            qs += list(bench_engine.ALL_FIRST_ORDER)
            directions = bench_engine._directions(ctx)
            post = bench_engine._variance
        engine = Engine(ctx.model, ctx.loss_fn, fail_mode="error", seed=0)
        opt = ctx.sgd()
        hvps: list[int] = []
        converged: list[bool] = []
        hessian_exact: Counter = Counter()
        state: dict = {"v0": None}

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = ctx.loss()
            if qs:
                with engine.gather(qs, directions=directions) as gathered:
                    loss.backward()
                if post is not None:
                    post(gathered, ctx)
                if "diag_hessian" in quantities:
                    hessian_exact[bool(gathered.exact[keys["diag_hessian"]])] += 1
            else:
                loss.backward()
            if trace_probes or lanczos:
                op = engine.hessian_operator()
                gen = engine.generator(op.device)
                if trace_probes:
                    hutchinson_trace(op, trace_probes, gen)
                if lanczos:
                    v0 = state["v0"] if lanczos == "warm" else None
                    res = lanczos_fn(
                        op, k=1, tol=LANCZOS_TOL, max_iter=LANCZOS_MAX_ITER, v0=v0, generator=gen
                    )
                    state["v0"] = res.eigenvectors[:, 0].detach()
                    hvps.append(res.num_matvecs)
                    converged.append(res.converged)
                del op
            opt.step()

        def stats() -> dict:
            out: dict = {}
            if hvps:
                out["lanczos"] = _hvp_summary(hvps, converged, warm=lanczos == "warm")
            if trace_probes:
                out["hutchinson_probes"] = trace_probes
            if hessian_exact:
                out["diag_hessian_exact"] = {str(k): v for k, v in hessian_exact.items()}
            return out

        step.stats = stats  # type: ignore[attr-defined]
        return step

    return Config(name, label, setup, "ours", note)


def _hvp_summary(hvps: list[int], converged: list[bool], warm: bool) -> dict:
    """HVP counts of every Lanczos call in the process (warm-up and calibration included).

    For a warm start the first call is a cold one; ``steady`` leaves it out.
    """
    steady = hvps[1:] if warm and len(hvps) > 1 else hvps
    return {
        "calls": len(hvps),
        "first": hvps[0],
        "median": statistics.median(steady),
        "min": min(steady),
        "max": max(steady),
        "mean": statistics.fmean(steady),
        "converged_fraction": sum(converged) / len(converged),
        "histogram": {str(k): v for k, v in sorted(Counter(hvps).items())},
        "tol": LANCZOS_TOL,
        "max_iter": LANCZOS_MAX_ITER,
    }


_EVERYTHING_NOTE = (
    "exact + MC diagonal GGN, diagonal Hessian, all first-order quantities (as "
    "`first_order_all` in engine.md) + variance in one backward pass, then a Hutchinson "
    f"trace ({HUTCHINSON_PROBES} probes) and warm-started Lanczos on one Hessian operator."
)

#: Our configurations (plus the plain-vs-plain noise floor). One line per configuration.
OURS: dict[str, Config] = {
    c.name: c
    for c in (
        PLAIN,
        curvature_config("diag_ggn", "diag GGN, exact", ["diag_ggn"]),
        curvature_config("diag_ggn_mc", "diag GGN, MC (M=1)", ["diag_ggn_mc"]),
        curvature_config(
            "diag_hessian",
            "diag Hessian",
            ["diag_hessian"],
            note="exact (= diag GGN) on these ReLU nets; the stats say whether each step was.",
        ),
        curvature_config(
            "hutchinson_trace",
            f"Hutchinson trace, K={HUTCHINSON_PROBES}",
            trace_probes=HUTCHINSON_PROBES,
            note=f"{HUTCHINSON_PROBES} Rademacher probes = {HUTCHINSON_PROBES} HVPs in one "
            "batched double-backward call on `engine.hessian_operator()` (which re-evaluates "
            "the loss with create_graph), after the plain backward.",
        ),
        curvature_config(
            "max_ev_cold",
            "max eigenvalue, Lanczos cold",
            lanczos="cold",
            note=f"Lanczos k=1, tol {LANCZOS_TOL:g}, cap {LANCZOS_MAX_ITER}, random start "
            "every step.",
        ),
        curvature_config(
            "max_ev",
            "max eigenvalue, Lanczos warm",
            lanczos="warm",
            note=f"Lanczos k=1, tol {LANCZOS_TOL:g}, cap {LANCZOS_MAX_ITER}, started from the "
            "previous step's eigenvector (the `hess_max_ev` "
            "instrument); the harness reuses one batch, so consecutive Hessians differ only "
            "by one SGD step — a favourable case for the warm start.",
        ),
        curvature_config(
            "everything",
            "everything (all curvature + all first-order)",
            ["diag_ggn", "diag_ggn_mc", "diag_hessian"],
            first_order=True,
            trace_probes=HUTCHINSON_PROBES,
            lanczos="warm",
            note=_EVERYTHING_NOTE,
        ),
    )
}
#: BackPACK's curvature extensions, measured in ``.bench-venv``.
REFERENCE: dict[str, Config] = {
    c.name: c
    for c in (
        backpack_config("backpack_diag_ggn", "BackPACK DiagGGNExact", "DiagGGNExact"),
        backpack_config("backpack_diag_ggn_mc", "BackPACK DiagGGNMC", "DiagGGNMC"),
        backpack_config("backpack_diag_hessian", "BackPACK DiagHessian", "DiagHessian"),
    )
}
CONFIGS: dict[str, Config] = {**OURS, **REFERENCE}

#: BackPACK's ratios measured earlier on this class of machine (issue #4), A/B/C.
PRIOR: dict[str, tuple[float, float, float]] = {
    "diag_ggn": (2.90, 8.80, 97.5),
    "diag_ggn_mc": (2.83, 2.04, 1.96),
    "diag_hessian": (2.96, 8.81, 80.1),
}
#: Our configuration → the BackPACK configuration measured here beside it.
REFERENCE_OF: dict[str, str] = {
    "diag_ggn": "backpack_diag_ggn",
    "diag_ggn_mc": "backpack_diag_ggn_mc",
    "diag_hessian": "backpack_diag_hessian",
}
#: Targets of issue #4: time ratio ≤ limit on these workloads.
TIME_TARGETS: dict[str, tuple[tuple[str, ...], float]] = {
    "diag_ggn": (("B",), 5.0),
    "diag_ggn_mc": (("B", "C"), 2.0),
}
#: Lanczos: median HVPs ≤ 10 on B at rtol 1e-3.
HVP_TARGET: tuple[tuple[str, ...], tuple[str, ...], float] = (("max_ev", "max_ev_cold"), ("B",), 10)
#: Everything on C (All-CNN-C, N = 32): process peak RSS ≤ 4 GiB.
MEMORY_TARGET: tuple[str, tuple[str, ...], float] = ("everything", ("C",), 4096.0)


# ------------------------------------------------------------------------------ running
def _copy_reference_worker(dest: Path) -> None:
    pkg = dest / "benchmarks"
    pkg.mkdir()
    for name in (*WORKER_FILES, "bench_curvature.py"):
        shutil.copy2(HERE / name, pkg / name)


def _options(opts: Options) -> Options:
    opts = dataclasses.replace(opts)
    if opts.quick:
        # the one quick timing process runs every cell; curvature cells are slow
        opts.timeout_s = max(opts.timeout_s, 120.0)
        opts.memory_configs = ["plain", "everything", "backpack_diag_ggn"]
    else:
        # BackPACK's DiagGGNExact on C takes ~35 s per step on an idle machine
        opts.timeout_s = max(opts.timeout_s, 2400.0)
    return opts


def run(
    opts: Options,
    workloads: Iterable[str] = tuple(WORKLOADS),
    names: Iterable[str] | None = None,
    out_dir: Path = RESULTS,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the curvature suite (ours, then BackPACK), write ``curvature.{json,md}``.

    With a subset of configurations (``names``), results are merged into an existing
    ``curvature.json``.
    """
    from benchmarks import bench_engine, reference_env

    workloads = list(workloads)
    names = list(names) if names else None
    bad = [n for n in names or () if n not in CONFIGS]
    if bad:
        raise ValueError(f"unknown configurations {bad}; known: {sorted(CONFIGS)}")
    opts = _options(opts)
    ours = [c for n, c in OURS.items() if names is None or n in names]
    refs = [c for n, c in REFERENCE.items() if names is None or n in names]
    mode = f"{'quick' if opts.quick else 'full'}, {opts.reps} reps, device {opts.device}"
    result: dict = {"meta": {}, "configs": {}}
    if ours:
        log(f"curvature benchmark: {len(ours)} configurations of ours on {workloads} ({mode})")
        with bench_engine.source_snapshot(use_head=not opts.quick) as (src, meta):
            log(f"  measuring cockpit/ from {meta['source']} ({meta['git_commit']})")
            launcher = Launcher(sys.executable, "benchmarks.bench_curvature", str(src))
            suite = run_suite(ours, workloads, opts, launcher, log, meta).to_json()
        result["meta"] = suite["meta"]
        result["plain_memory"] = suite["plain_memory"]
        result["configs"].update(suite["configs"])
    if refs:
        log(f"BackPACK curvature: {len(refs)} configurations on {workloads} ({mode})")
        try:
            info = reference_env.ensure(log=log)
            if not info.get("ok"):
                raise RuntimeError(f"the reference environment is broken: {info}")
        except Exception as err:  # noqa: BLE001 - ours are still worth writing
            log(f"  skipped: {err}")
            for c in refs:
                result["configs"][c.name] = {
                    "label": c.label,
                    "group": c.group,
                    "note": c.note,
                    "results": {w: {"status": f"skipped: {err}"} for w in workloads},
                }
        else:
            info.pop("sys_path", None)
            with tempfile.TemporaryDirectory(prefix="cockpit-bench-curv-") as tmp:
                _copy_reference_worker(Path(tmp))
                env = reference_env.clean_env()
                env[_REPO_ENV] = str(HERE.parent)
                launcher = Launcher(
                    str(reference_env.python()), "benchmarks.bench_curvature", tmp, env
                )
                suite = run_suite(refs, workloads, opts, launcher, log, {"reference_env": info})
                suite = suite.to_json()
            result["reference_meta"] = suite["meta"]
            result["reference_plain_memory"] = suite["plain_memory"]
            result["configs"].update(suite["configs"])
    if not result["meta"]:
        result["meta"] = result.get("reference_meta", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "curvature.json"
    if names and path.exists():
        old = json.loads(path.read_text())
        old["configs"].update(result["configs"])
        old.setdefault("partial_runs", []).append(
            {k: result[k] for k in ("meta", "reference_meta") if k in result}
        )
        for key in ("reference_meta", "reference_plain_memory"):
            if key in result and key not in old:
                old[key] = result[key]
        result = old
    path.write_text(json.dumps(result, indent=1))
    md = out_dir / "curvature.md"
    md.write_text(render_markdown(result))
    log(f"wrote {path} and {md}")
    return result


# ----------------------------------------------------------------------------- Markdown
def _entry(data: dict, name: str, w: str) -> dict | None:
    return data.get("configs", {}).get(name, {}).get("results", {}).get(w)


def _mark(ok: bool | None) -> str:
    return "?" if ok is None else ("✓" if ok else "✗")


def _time_target(data: dict, name: str, ws: list[str]) -> str:
    if name not in TIME_TARGETS:
        return ""
    t_ws, limit = TIME_TARGETS[name]
    marks = []
    for w in t_ws:
        if w not in ws:
            continue
        e = _entry(data, name, w)
        marks.append(
            _mark(None if not e or e.get("status") != "ok" else e["ratio_median"] <= limit)
        )
    return f"≤{limit:g}x on {','.join(t_ws)}" + (f": {''.join(marks)}" if marks else "")


def _lanczos_cell(entry: dict | None) -> str:
    lz = (entry or {}).get("stats", {}).get("lanczos")
    if not lz:
        return "—" if not entry or entry.get("status") == "ok" else entry.get("status", "?")
    text = f"{lz['median']:g} ({lz['min']}–{lz['max']})"
    text += f", {100 * lz['converged_fraction']:.0f}% conv., {lz['calls']} calls"
    return text + f", first {lz['first']}"


def _hessian_exact_cell(entry: dict | None) -> str:
    ex = (entry or {}).get("stats", {}).get("diag_hessian_exact")
    if not ex:
        return "—"
    return f"{ex.get('True', 0)}/{sum(ex.values())} steps exact"


def render_markdown(data: dict) -> str:
    """The curvature tables: time, Lanczos HVPs, memory, absolute step times."""
    from benchmarks.bench_engine import _load, _mem_cell, _n, _timing_section

    meta = data.get("meta", {})
    opts = meta.get("options", {})
    ws = [w for w in WORKLOADS if any(_entry(data, n, w) for n in data["configs"])]
    ref_meta = data.get("reference_meta")
    versions = ", ".join(
        f"{k} {v['version']}"
        for k, v in (ref_meta or {}).get("reference_env", {}).items()
        if isinstance(v, dict) and "version" in v
    )
    lines = [
        "# Curvature benchmark",
        "",
        "Step time of each configuration divided by a plain fwd+bwd+SGD step, timed in the "
        "same process, interleaved (plain, config, plain, …): **median ratio (min–max over "
        f"{opts.get('reps')} repetitions)**. "
        + (
            "Quick smoke test: one process timed everything; not a benchmark result."
            if opts.get("quick")
            else "Each (configuration, workload) was timed in its own process and each memory "
            "measurement ran in a fresh one."
        )
        + " Generated by `python -m benchmarks curvature`; do not edit by hand.",
        "",
        f"- machine: {meta.get('cpu_model', '?')}, {meta.get('cpu_count')} CPUs, "
        f"`torch.set_num_threads({meta.get('num_threads')})`, torch {meta.get('torch')}, "
        f"device {meta.get('device')}",
        f"- date: {meta.get('date')}; load average at start {_load(meta.get('loadavg_start'))}, "
        f"at end {_load(meta.get('loadavg_end'))}; engine measured at commit "
        f"{meta.get('git_commit')} ({meta.get('source', '?')})",
        "- workloads: "
        + "; ".join(f"{w} = {WORKLOADS[w].name}, N={_n(data, w) or WORKLOADS[w].n}" for w in ws),
        f"- Hutchinson trace: K = {HUTCHINSON_PROBES} Rademacher probes (= {HUTCHINSON_PROBES} "
        f"HVPs, one batched call); Lanczos: k = 1, tol {LANCZOS_TOL:g} (relative error bound), "
        f"cap {LANCZOS_MAX_ITER} HVPs. Both on `Engine.hessian_operator()` after the user's "
        "backward pass, which re-evaluates the loss once with `create_graph` (included).",
        "- BackPACK prior: ratios measured earlier on this class of machine (issue #4). "
        "BackPACK here: "
        + (
            f"measured in this harness in `.bench-venv` ({versions or 'versions unknown'}) on "
            f"{ref_meta.get('date')}, load {_load(ref_meta.get('loadavg_start'))} → "
            f"{_load(ref_meta.get('loadavg_end'))}."
            if ref_meta
            else "not measured in this run."
        ),
        "",
        "## Time",
        "",
        "| configuration | "
        + " | ".join(ws)
        + " | BackPACK prior "
        + "/".join(ws)
        + " | BackPACK here "
        + "/".join(ws)
        + " | target |",
        "|---|" + "---:|" * len(ws) + "---|---|---|",
    ]
    for name, cfg in data["configs"].items():
        cells = [fmt_ratio(_entry(data, name, w)) for w in ws]
        prior = PRIOR.get(name)
        prior_txt = (
            "/".join(f"{v:g}" for w, v in zip("ABC", prior, strict=True) if w in ws)
            if prior
            else ""
        )
        ref = REFERENCE_OF.get(name)
        ref_txt = ""
        if ref and ref in data["configs"]:
            ref_txt = "/".join(fmt_ratio(_entry(data, ref, w), spread=False) for w in ws)
        target = _time_target(data, name, ws)
        if name in HVP_TARGET[0]:
            target = f"median ≤{HVP_TARGET[2]:g} HVPs on {','.join(HVP_TARGET[1])} (below)"
        if name == MEMORY_TARGET[0]:
            target = f"peak RSS ≤{MEMORY_TARGET[2] / 1024:g} GiB on {','.join(MEMORY_TARGET[1])}"
            target += " (below)"
        lines.append(
            f"| {cfg['label']} | " + " | ".join(cells) + f" | {prior_txt} | {ref_txt} | {target} |"
        )
    notes = [f"- *{c['label']}*: {c['note']}" for c in data["configs"].values() if c.get("note")]
    if notes:
        lines += ["", *notes]
    lines += _stats_section(data, ws)
    lines += _memory_section(data, ws, _mem_cell)
    lines += _timing_section(data, ws)
    return "\n".join(lines) + "\n"


def _stats_section(data: dict, ws: list[str]) -> list[str]:
    names = [n for n in data["configs"] if n in ("max_ev", "max_ev_cold", "everything")]
    hess = [n for n in data["configs"] if n in ("diag_hessian", "everything")]
    if not names and not hess:
        return []
    hvp_names, hvp_ws, limit = HVP_TARGET
    lines = [
        "",
        "## Lanczos: Hessian-vector products per call",
        "",
        "Median (min–max) HVPs per Lanczos call over every step of the timing process "
        "(warm-up and calibration included; for a warm start the first call, a cold one, is "
        "left out of the median and shown as *first*), share of calls that met the tolerance.",
        "",
        "| configuration | " + " | ".join(ws) + " | target |",
        "|---|" + "---:|" * len(ws) + "---|",
    ]
    for name in names:
        target = ""
        if name in hvp_names:
            marks = []
            for w in hvp_ws:
                lz = ((_entry(data, name, w) or {}).get("stats") or {}).get("lanczos")
                marks.append(_mark(None if not lz else lz["median"] <= limit))
            target = f"median ≤{limit:g} on {','.join(hvp_ws)}: {''.join(marks)}"
        cells = [_lanczos_cell(_entry(data, name, w)) for w in ws]
        lines.append(
            f"| {data['configs'][name]['label']} | " + " | ".join(cells) + f" | {target} |"
        )
    if hess:
        lines += [
            "",
            "Diagonal Hessian: steps on which the engine proved it exact (otherwise it falls "
            "back to a Hutchinson estimate with a warning).",
            "",
            "| configuration | " + " | ".join(ws) + " |",
            "|---|" + "---:|" * len(ws),
        ]
        for name in hess:
            cells = [_hessian_exact_cell(_entry(data, name, w)) for w in ws]
            lines.append(f"| {data['configs'][name]['label']} | " + " | ".join(cells) + " |")
    return lines


def _plain_row(label: str, plain: dict, ws: list[str]) -> str:
    return (
        f"| {label} | "
        + " | ".join(
            plain_mem_text(plain[w])
            if plain.get(w, {}).get("status") == "ok"
            else plain.get(w, {}).get("status", "—")
            for w in ws
        )
        + " | |"
    )


def _memory_section(data: dict, ws: list[str], mem_cell: Callable) -> list[str]:
    plain = data.get("plain_memory") or {}
    ref_plain = data.get("reference_plain_memory") or {}
    if not plain and not ref_plain:
        return []
    name_t, ws_t, limit = MEMORY_TARGET
    lines = [
        "",
        "## Memory",
        "",
        "Footprint of a step (peak RSS of a fresh process running only this configuration "
        "minus its RSS before the first step): MiB (ratio to the plain step's footprint, "
        "peak-RSS growth over the plain process in MiB); BackPACK's rows relative to a plain "
        "step in `.bench-venv`. Target column: process peak RSS.",
        "",
        "| configuration | " + " | ".join(ws) + " | target |",
        "|---|" + "---:|" * len(ws) + "---|",
    ]
    if plain:
        lines.append(_plain_row("plain step", plain, ws))
    if ref_plain:
        lines.append(_plain_row("plain step (`.bench-venv`)", ref_plain, ws))
    for name, cfg in data["configs"].items():
        if name == PLAIN.name:
            continue
        cells = [mem_cell(_entry(data, name, w)) for w in ws]
        if all(c == "—" for c in cells):
            continue
        target = ""
        if name == name_t:
            parts = []
            for w in ws_t:
                mem = (_entry(data, name, w) or {}).get("memory") or {}
                has = mem.get("status") == "ok" and "peak_rss_mib" in mem
                ok = mem["peak_rss_mib"] <= limit if has else None
                peak = f" ({mem['peak_rss_mib']:.0f} MiB)" if ok is not None else ""
                parts.append(_mark(ok) + peak)
            target = f"peak ≤{limit / 1024:g} GiB on {','.join(ws_t)}: " + " ".join(parts)
        lines.append(f"| {cfg['label']} | " + " | ".join(cells) + f" | {target} |")
    return lines


def write_markdown(out_dir: Path = RESULTS) -> Path | None:
    """(Re)write ``curvature.md`` from ``curvature.json``."""
    path = out_dir / "curvature.json"
    if not path.exists():
        return None
    md = out_dir / "curvature.md"
    md.write_text(render_markdown(json.loads(path.read_text())))
    return md


if __name__ == "__main__":
    if os.environ.get(_REPO_ENV):  # a BackPACK worker in .bench-venv: never our cockpit
        _guard()
    rc = worker_cli(CONFIGS)
    if rc is None:
        sys.exit(
            "use `python -m benchmarks curvature`; this module's CLI is the worker entry point"
        )
    sys.exit(rc)
