"""Cockpit presets side by side: ours vs Cockpit 1.0.2, each step's cost over a plain step.

Configurations (:data:`CONFIGS`):

- ``ours_<preset>`` for ``economy``, ``business``, ``full``: our public API as a user
  runs it, :class:`cockpit.Cockpit` with ``instruments=<preset>``, every step tracked,
  and a **temporary logdir**, so the Parquet log writer (and its background thread) is
  part of the measured step. ``ours_<preset>_nolog`` (``logdir=None``) isolates the
  writer's share; not run by default. ``ours_business_mc``: the business preset with
  the Monte-Carlo diagonal GGN for ``hess_trace`` and ``tic_diag`` (the cheap
  alternative to the exact diagonal Hessian that matches Cockpit's numbers).
- ``ref_<preset>``: Cockpit 1.0.2 with ``quantities=configuration(<preset>)`` and its
  documented loop (BackPACK-``extend``-ed model and loss, individual losses computed
  by a second ``reduction="none"`` loss call, ``info=...``,
  ``backward(create_graph=cockpit.create_graph(step))``). Its results stay in memory,
  as Cockpit writes its JSON only when asked (``cockpit.write``), so no writer is timed.
- ``ref_<instrument>``: each Cockpit 1.0.2 quantity of the ``full`` preset alone.

Every (configuration, workload) is timed in its own process, interleaved with a plain
step on a copy of the same model (:func:`benchmarks.harness.time_config`), and its
memory measured in a fresh one (:func:`benchmarks.harness.memory_config`) under the
per-process cap. Our workers run from a ``git archive HEAD`` snapshot of ``cockpit/``,
``instruments/`` and ``benchmarks/`` (working tree for ``--quick``); Cockpit 1.0.2's run
in ``.bench-venv`` from a temporary copy of the torch-only benchmark modules, like
:mod:`benchmarks.bench_reference`.

Workload keys extend :data:`benchmarks.workloads.WORKLOADS` for the scaling study
(:mod:`benchmarks.bench_scaling`): ``"B@n=256"`` is workload B with N = 256, ``"A@w=512"``
the MLP 784-512-10 (N of A). This module imports only torch and the standard library at
module level (ours and Cockpit 1.0.2 are imported inside the configurations), so it
also runs inside ``.bench-venv``.

``python -m benchmarks presets`` writes ``results/presets.{json,md}``;
``python -m benchmarks.bench_presets _worker SPEC`` is the measurement process.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

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
)
from benchmarks.workloads import WORKLOADS, Workload

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PRESETS = ("economy", "business", "full")
#: Cockpit 1.0.2 quantity classes of its ``full`` preset → our instrument names.
REFERENCE_INSTRUMENTS = {
    "Alpha": "alpha",
    "Distance": "distance",
    "GradHist1d": "grad_hist_1d",
    "GradNorm": "grad_norm",
    "InnerTest": "inner_test",
    "Loss": "loss",
    "NormTest": "norm_test",
    "OrthoTest": "ortho_test",
    "UpdateSize": "update_size",
    "TICDiag": "tic_diag",
    "HessTrace": "hess_trace",
    "HessMaxEV": "hess_max_ev",
    "GradHist2d": "grad_hist_2d",
}
#: Cockpit 1.0.2 measured earlier on this class of machine (issue #5), A/B/C; None: OOM.
PRIOR: dict[str, tuple[float | None, ...]] = {
    "economy": (145, 10.9, 3.24),
    "business": (158, 20.6, 94.7),
    "full": (391, 105, None),
}
#: Time targets (issue #5): preset → ((workloads, max ratio), ...).
TIME_TARGETS: dict[str, tuple[tuple[tuple[str, ...], float], ...]] = {
    "economy": ((("B", "C"), 1.5), (("A",), 3.0)),
    "business": ((("B", "C"), 2.5),),
    "full": ((("B",), 6.0),),
}
#: Memory targets: preset → (workloads, max peak RSS in GiB of the process).
MEMORY_TARGETS: dict[str, tuple[tuple[str, ...], float]] = {"full": (("C",), 4.0)}
#: Files a Cockpit 1.0.2 worker needs (torch + standard library only).
REFERENCE_WORKER_FILES = ("bench_presets.py",)
#: Measurement processes of heavy reference configurations (Cockpit's business preset
#: and HessMaxEV on All-CNN-C take 30-100 s per step) need more than the default 900 s.
FULL_TIMEOUT_S = 2400.0
#: Per (configuration, workload) in the single quick timing process.
QUICK_TIMEOUT_S = 120.0


# ------------------------------------------------------------------- workloads
def mlp_width(width: int) -> nn.Sequential:
    """MLP 784-width-10 with ReLU (workload A has width 128)."""
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))


def resolve_workload(key: str) -> Workload:
    """The workload of a key: ``"A"``, ``"B"``, ``"C"`` or a variant of one.

    ``"<key>@n=<N>"`` changes the batch size, ``"A@w=<width>"`` the MLP's hidden width,
    both together ``"A@w=512,n=64"``. A variant uses its N also in quick mode.
    """
    base, _, spec = key.partition("@")
    if base not in WORKLOADS:
        raise KeyError(f"unknown workload {key!r}; choose from {sorted(WORKLOADS)}")
    w = WORKLOADS[base]
    if not spec:
        return w
    opts = dict(part.split("=", 1) for part in spec.split(","))
    unknown = set(opts) - {"n", "w"}
    if unknown:
        raise KeyError(f"workload {key!r}: unknown options {sorted(unknown)} (n, w)")
    changes: dict = {"key": key}
    name = w.name
    if "w" in opts:
        if base != "A":
            raise KeyError(f"workload {key!r}: only the MLP (A) has a width option")
        width = int(opts["w"])
        changes["build"] = functools.partial(mlp_width, width)
        name = f"MLP 784-{width}-10"
    n = int(opts.get("n", w.n))
    changes.update(n=n, n_quick=n, name=f"{name}, N={n}")
    return dataclasses.replace(w, **changes)


# ------------------------------------------------------------ configurations
def ours_preset(preset: str, logdir: bool = True, mc: bool = False) -> Config:
    """Our :class:`cockpit.Cockpit` with ``instruments=preset``, every step tracked.

    ``mc``: the preset with the Monte-Carlo diagonal GGN (one sample) for ``hess_trace``
    and ``tic_diag`` instead of the exact diagonal Hessian (``ours_<preset>_mc``).
    """

    def setup(ctx: Context) -> StepFn:
        from cockpit import Cockpit

        opt = ctx.sgd()
        run_dir = None
        if logdir:
            tmp = tempfile.mkdtemp(prefix="cockpit-bench-log-")
            atexit.register(shutil.rmtree, tmp, True)
            run_dir = Path(tmp) / "run"
        instruments: object = preset
        if mc:
            from instruments import get

            curvature = dict(curvature="ggn_mc")
            instruments = [preset, get("hess_trace", **curvature), get("tic_diag", **curvature)]
        cp = Cockpit(ctx.model, ctx.loss_fn, opt, instruments=instruments, logdir=run_dir)
        atexit.register(cp.close)  # runs before the rmtree (LIFO)
        counter = itertools.count()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = ctx.loss()
            with cp.step(next(counter), loss):
                loss.backward()
            opt.step()

        return step

    where = "temporary logdir (Parquet writer included)" if logdir else "logdir=None"
    spec = repr(preset)
    if mc:
        spec = f"[{preset!r}, get('hess_trace', curvature='ggn_mc'), get('tic_diag', ...)]"
    return Config(
        f"ours_{preset}" + ("_mc" if mc else "") + ("" if logdir else "_nolog"),
        f"ours {preset}" + (", MC curvature" if mc else "") + ("" if logdir else " (logdir=None)"),
        setup,
        "ours",
        f"Cockpit(instruments={spec}), {where}, every step tracked.",
    )


def reference_config(name: str, label: str, preset: str | None = None, *quantities: str) -> Config:
    """Cockpit 1.0.2 with a preset or some quantity classes, in its documented loop."""

    def setup(ctx: Context) -> StepFn:
        from backpack import extend
        from cockpit.utils.configuration import configuration
        from cockpit.utils.schedules import linear

        from cockpit import Cockpit
        from cockpit import quantities as cq

        model = extend(ctx.model)
        loss_fn = extend(ctx.loss_fn)
        individual_loss_fn = type(ctx.loss_fn)(reduction="none")
        opt = ctx.sgd(model)
        if preset is not None:
            qs = configuration(preset)
        else:
            qs = [getattr(cq, q)(track_schedule=linear(1)) for q in quantities]
        cp = Cockpit(model.parameters(), quantities=qs)
        counter = itertools.count()
        n = ctx.n

        def step() -> None:
            global_step = next(counter)
            opt.zero_grad(set_to_none=True)
            outputs = model(ctx.x)
            loss = loss_fn(outputs, ctx.y)
            losses = individual_loss_fn(outputs, ctx.y)
            info = {"batch_size": n, "individual_losses": losses, "loss": loss, "optimizer": opt}
            with cp(global_step, info=info):
                loss.backward(create_graph=cp.create_graph(global_step))
            opt.step()

        return step

    return Config(name, label, setup, "reference")


#: Name → configuration. One line per configuration.
CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        *(ours_preset(p) for p in PRESETS),
        *(ours_preset(p, logdir=False) for p in PRESETS),
        ours_preset("business", mc=True),
        *(reference_config(f"ref_{p}", f"Cockpit 1.0.2 {p}", p) for p in PRESETS),
        *(
            reference_config(f"ref_{ours}", f"Cockpit 1.0.2 {q} alone", None, q)
            for q, ours in REFERENCE_INSTRUMENTS.items()
        ),
    )
}
#: What ``python -m benchmarks presets`` runs without ``--configs``.
DEFAULT = [
    *(f"ours_{p}" for p in PRESETS),
    "ours_business_mc",
    *(f"ref_{p}" for p in PRESETS),
    *(f"ref_{i}" for i in REFERENCE_INSTRUMENTS.values()),
]
#: ``--quick`` without ``--configs``: the presets and two instruments alone (a smoke
#: test of every kind of configuration; the others with ``--quick --configs ...``).
QUICK_DEFAULT = [*DEFAULT[:7], "ref_alpha", "ref_hess_trace"]


# ---------------------------------------------------------------------- worker
def worker_main(spec_json: str) -> int:
    """Run one measurement process: :func:`benchmarks.harness.worker_main` with variants.

    The same loop, but workload keys go through :func:`resolve_workload`.
    """
    from benchmarks import harness

    spec = json.loads(spec_json)
    opts = Options(**spec["options"])
    harness._setup_process(opts)
    known = {PLAIN.name: PLAIN, **CONFIGS}
    measure = harness.time_config if spec["mode"] == "time" else harness.memory_config
    results: dict[str, dict[str, dict]] = {}
    for name in spec["configs"]:
        for key in spec["workloads"]:
            try:
                entry = measure(known[name], resolve_workload(key), opts)
            except Exception as err:  # noqa: BLE001 - one failing entry must not stop the rest
                if any(harness._is_oom(e) for e in _chain(err)):
                    entry = {"status": f"skipped: exceeds {opts.mem_cap_gib:g} GiB"}
                else:
                    first = (str(err).splitlines() or [""])[0][:300]
                    entry = {
                        "status": f"failed: {type(err).__name__}: {first}",
                        "traceback": traceback.format_exc(limit=8),
                    }
            results.setdefault(name, {})[key] = entry
            gc.collect()
            Path(spec["out"]).write_text(json.dumps(results))
    return 0


def _chain(err: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from or during.

    Cockpit 1.0.2's context manager runs its tracking in ``__exit__`` even when the
    backward pass failed, so an allocation failure there surfaces as an
    ``AttributeError`` (a missing BackPACK buffer) whose context is the real error.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


# ---------------------------------------------------------------------- parent
@contextmanager
def source_snapshot(use_head: bool = True) -> Iterator[tuple[Path, dict]]:
    """A ``git archive HEAD`` copy of ``cockpit/``, ``instruments/``, ``benchmarks/``.

    Others edit the working tree while a long benchmark runs; measuring the committed
    code keeps every configuration on the same code and records which. ``use_head=False``
    (or no git) measures the working tree and says whether it was dirty.
    """

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    paths = ("cockpit", "instruments", "benchmarks")
    commit = git("rev-parse", "--short", "HEAD") or None
    # COCKPIT_BENCH_SOURCE=worktree: measure the files as they are (a copied tree whose
    # .git may not match them, e.g. on a lent GPU machine)
    use_head = use_head and os.environ.get("COCKPIT_BENCH_SOURCE") != "worktree"
    if use_head and commit:
        with tempfile.TemporaryDirectory(prefix="cockpit-bench-src-") as tmp:
            tar = Path(tmp) / "src.tar"
            proc = subprocess.run(
                ["git", "archive", "--format=tar", "-o", str(tar), "HEAD", *paths],
                cwd=ROOT,
                capture_output=True,
            )
            if proc.returncode == 0:
                with tarfile.open(tar) as tf:
                    tf.extractall(tmp, filter="data")
                if (Path(tmp) / "benchmarks" / "bench_presets.py").exists():
                    yield Path(tmp), {"git_commit": commit, "source": "git archive HEAD"}
                    return
    dirty = bool(git("status", "--porcelain", "--", *paths))
    yield ROOT, {"git_commit": commit, "source": "working tree" + (" (dirty)" if dirty else "")}


def run_ours(
    names: list[str], workloads: list[str], opts: Options, log: Callable[[str], None]
) -> dict:
    """Measure our configurations (in this interpreter, from the source snapshot)."""
    if not names:
        return {}
    with source_snapshot(use_head=not opts.quick) as (src, meta):
        log(f"  ours: measuring {meta['source']} ({meta['git_commit']})")
        launcher = Launcher(sys.executable, "benchmarks.bench_presets", str(src))
        suite = run_suite([CONFIGS[n] for n in names], workloads, opts, launcher, log, meta)
    return suite.to_json()


def run_reference(
    names: list[str], workloads: list[str], opts: Options, log: Callable[[str], None]
) -> dict:
    """Measure Cockpit 1.0.2 configurations in ``.bench-venv`` (built on first use)."""
    if not names:
        return {}
    from benchmarks import bench_reference, reference_env

    info = reference_env.ensure(log=log)
    if not info.get("ok"):
        raise RuntimeError(f"the reference environment is broken: {info}")
    info.pop("sys_path", None)
    with tempfile.TemporaryDirectory(prefix="cockpit-bench-ref-") as tmp:
        bench_reference._copy_worker_files(Path(tmp), extra=REFERENCE_WORKER_FILES)
        env = reference_env.clean_env()
        env[bench_reference._REPO_ENV] = str(ROOT)
        launcher = Launcher(str(reference_env.python()), "benchmarks.bench_presets", tmp, env)
        configs = [CONFIGS[n] for n in names]
        suite = run_suite(configs, workloads, opts, launcher, log, {"reference_env": info})
    return suite.to_json()


def prepare_options(opts: Options, quick_memory: Iterable[str]) -> Options:
    """Adjust the options: a longer per-process timeout for the full run.

    In quick mode, memory is measured only for ``quick_memory`` and the plain step.
    """
    opts = dataclasses.replace(opts)
    if opts.quick:
        opts.memory_configs = ["plain", *quick_memory]
        opts.timeout_s = max(opts.timeout_s, QUICK_TIMEOUT_S)
    else:
        opts.timeout_s = max(opts.timeout_s, FULL_TIMEOUT_S)
    return opts


def run(
    opts: Options,
    workloads: Iterable[str] = tuple(WORKLOADS),
    names: Iterable[str] | None = None,
    out_dir: Path = RESULTS,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the preset suite; write ``presets.json`` and ``presets.md`` in ``out_dir``.

    With a subset of configurations (``names``), results are merged into an existing
    ``presets.json``.
    """
    workloads = list(workloads)
    chosen = list(names or (QUICK_DEFAULT if opts.quick else DEFAULT))
    opts = prepare_options(opts, ["ours_economy", "ref_economy"])
    log(
        f"presets benchmark: {len(chosen)} configurations on {workloads} "
        f"({'quick' if opts.quick else 'full'}, {opts.reps} reps, device {opts.device})"
    )
    t0 = time.perf_counter()
    ours = run_ours([n for n in chosen if CONFIGS[n].group == "ours"], workloads, opts, log)
    ref = run_reference([n for n in chosen if CONFIGS[n].group != "ours"], workloads, opts, log)
    result = {
        "meta": {"quick": opts.quick, "workloads": workloads, "seconds": time.perf_counter() - t0},
        "ours": ours,
        "reference": ref,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "presets.json"
    if names and path.exists():
        result = _merge(json.loads(path.read_text()), result)
    path.write_text(json.dumps(result, indent=1))
    (out_dir / "presets.md").write_text(render_markdown(result))
    log(f"wrote {path} and {out_dir / 'presets.md'}")
    return result


def _merge(old: dict, new: dict) -> dict:
    for side in ("ours", "reference"):
        if not new.get(side):
            continue
        if not old.get(side):
            old[side] = new[side]
            continue
        # merge per workload: a run on --workloads C must not drop A and B
        for name, entry in new[side]["configs"].items():
            kept = old[side]["configs"].setdefault(name, entry)
            if kept is not entry:
                kept.setdefault("results", {}).update(entry.get("results", {}))
        old[side].setdefault("plain_memory", {}).update(new[side].get("plain_memory") or {})
        old[side].setdefault("partial_runs", []).append(new[side]["meta"])
    old.setdefault("partial_runs", []).append(new["meta"])
    meta = old.setdefault("meta", {})
    seen = [*meta.get("workloads", []), *new["meta"]["workloads"]]
    meta["workloads"] = [w for w in dict.fromkeys(seen)]
    return old


# ------------------------------------------------------------------- Markdown
def entry(suite: dict | None, name: str, w: str) -> dict | None:
    """One result cell, or None."""
    if not suite:
        return None
    return suite.get("configs", {}).get(name, {}).get("results", {}).get(w)


def mem_cell(e: dict | None) -> str:
    """``"412 MiB (2.31x; peak 0.9 GiB)"`` or the status of a skipped/failed measurement."""
    if not e:
        return "—"
    if e.get("status") != "ok":
        return _status(e)
    mem = e.get("memory")
    if not mem:
        return "—"
    if mem.get("status") != "ok":
        return _status(mem)
    if "step_rss_mib" not in mem:  # one-process CUDA run: no RSS
        return f"CUDA {mem.get('cuda_step_mib', float('nan')):.0f} MiB"
    text = f"{mem['step_rss_mib']:.0f} MiB"
    if "mem_ratio" in e:
        text += f" ({e['mem_ratio']:.2f}x"
    text += f"; peak {mem['peak_rss_mib'] / 1024:.2f} GiB" + (")" if "mem_ratio" in e else "")
    if "cuda_step_mib" in mem:
        text += f"; CUDA {mem['cuda_step_mib']:.0f} MiB"
    return text


def _status(e: dict) -> str:
    return e.get("status", "?").replace("|", "/")


def _load(v) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def _meta_lines(suite: dict, what: str) -> list[str]:
    m = suite.get("meta") or {}
    if not m:
        return []
    extra = ""
    if "git_commit" in m:
        extra = f"; code: commit {m.get('git_commit')} ({m.get('source', '?')})"
    env = m.get("reference_env") or {}
    versions = ", ".join(
        f"{k} {v['version']}" for k, v in env.items() if isinstance(v, dict) and "version" in v
    )
    if versions:
        extra = f"; `.bench-venv`: {versions}"
    lines = [
        f"- {what}: {m.get('date')}, {m.get('cpu_model', '?')}, {m.get('cpu_count')} CPUs, "
        f"`torch.set_num_threads({m.get('num_threads')})`, torch {m.get('torch')}, device "
        f"{m.get('device')}" + (f" ({m['gpu']})" if m.get("gpu") else "") + f"; load average "
        f"{_load(m.get('loadavg_start'))} at start, {_load(m.get('loadavg_end'))} at end{extra}"
    ]
    for p in suite.get("partial_runs") or ():  # later runs merged in (--configs/--workloads)
        code = f", code: commit {p['git_commit']}" if p.get("git_commit") else ""
        lines.append(
            f"  - merged later: {p.get('date')}, load average {_load(p.get('loadavg_start'))} "
            f"at start, {_load(p.get('loadavg_end'))} at end{code}"
        )
    return lines


def _check(value: float | None, limit: float) -> str:
    if value is None:
        return "?"
    return "✓" if value <= limit else "✗"


def render_markdown(result: dict) -> str:
    """The presets table (time, memory, Cockpit's instruments alone, absolute times)."""
    ours, ref = result.get("ours") or {}, result.get("reference") or {}
    quick = result.get("meta", {}).get("quick")
    ws = [w for w in WORKLOADS if w in result.get("meta", {}).get("workloads", WORKLOADS)]
    reps = (ours.get("meta") or ref.get("meta") or {}).get("options", {}).get("reps")
    lines = [
        "# Cockpit presets: ours vs Cockpit 1.0.2",
        "",
        "Step time with the cockpit attached (every step tracked) divided by a plain "
        "fwd+bwd+SGD step, timed in the same process, interleaved: **median ratio "
        f"(min–max over {reps} repetitions)**. "
        + (
            "**Quick smoke test** (small N, one process timed everything): not a result."
            if quick
            else "Each (configuration, workload) was timed in its own process; memory in a "
            "fresh one."
        )
        + " Generated by `python -m benchmarks presets`; do not edit by hand.",
        "",
        *_meta_lines(ours, "ours"),
        *_meta_lines(ref, "Cockpit 1.0.2"),
        "- workloads: "
        + "; ".join(f"{w} = {WORKLOADS[w].name}, N={_n(ours, ref, w, bool(quick))}" for w in ws),
        "- ours: public `Cockpit(model, loss_fn, optimizer, instruments=preset, "
        "logdir=<temporary directory>)`: the Parquet log writer is part of the step, as "
        "for a user. Cockpit 1.0.2: `configuration(preset)` in its documented loop "
        "(BackPACK `extend`, individual losses by a second `reduction='none'` loss call, "
        "`backward(create_graph=cockpit.create_graph(step))`); it keeps results in memory.",
        "- prior: Cockpit 1.0.2 measured earlier on this class of machine (issue #5).",
        "",
        "## Time",
        "",
        "| preset | "
        + " | ".join(f"{w} ours" for w in ws)
        + " | "
        + " | ".join(f"{w} Cockpit 1.0.2" for w in ws)
        + " | prior "
        + "/".join(ws)
        + " | target |",
        "|---|" + "---:|" * (2 * len(ws)) + "---|---|",
    ]
    for p in PRESETS:
        o = [entry(ours, f"ours_{p}", w) for w in ws]
        r = [entry(ref, f"ref_{p}", w) for w in ws]
        prior = "/".join(
            ("OOM" if v is None else f"{v:g}")
            for w, v in zip("ABC", PRIOR[p], strict=True)
            if w in ws
        )
        targets = []
        for t_ws, limit in TIME_TARGETS.get(p, ()):
            marks = "".join(
                _check(_ratio(entry(ours, f"ours_{p}", w)), limit) for w in t_ws if w in ws
            )
            if marks:
                targets.append(f"≤{limit:g}x on {','.join(t_ws)}: {marks}")
        lines.append(
            f"| {p} | "
            + " | ".join(fmt_ratio(e) if e else "—" for e in o)
            + " | "
            + " | ".join(fmt_ratio(e) if e else "—" for e in r)
            + f" | {prior} | {'; '.join(targets)} |"
        )
    main_rows = {f"ours_{p}" for p in PRESETS}
    variants = [n for n in (ours.get("configs") or {}) if n not in main_rows]
    for name in variants:  # _nolog (writer off), _mc (Monte-Carlo curvature)
        cells = [fmt_ratio(entry(ours, name, w)) if entry(ours, name, w) else "—" for w in ws]
        label = ours["configs"][name]["label"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + " |" * len(ws) + " | |")
    lines += [
        "",
        "## Memory",
        "",
        "Footprint of the first steps (2; quick: 1) in a fresh process (peak RSS minus RSS "
        "before the first step; "
        "ratio to the plain step's footprint; peak RSS of the process). A configuration that "
        "does not fit the per-process cap is skipped and says so.",
        "",
        "| preset | "
        + " | ".join(f"{w} ours" for w in ws)
        + " | "
        + " | ".join(f"{w} Cockpit 1.0.2" for w in ws)
        + " | target |",
        "|---|" + "---:|" * (2 * len(ws)) + "---|",
        "| plain step | "
        + " | ".join(_plain_mem(ours, w) for w in ws)
        + " | "
        + " | ".join(_plain_mem(ref, w) for w in ws)
        + " | |",
    ]
    for p in PRESETS:
        target = ""
        if p in MEMORY_TARGETS:
            t_ws, gib = MEMORY_TARGETS[p]
            marks = "".join(
                _check(_peak_gib(entry(ours, f"ours_{p}", w)), gib) for w in t_ws if w in ws
            )
            target = f"peak ≤{gib:g} GiB on {','.join(t_ws)}: {marks}" if marks else ""
        lines.append(
            f"| {p} | "
            + " | ".join(mem_cell(entry(ours, f"ours_{p}", w)) for w in ws)
            + " | "
            + " | ".join(mem_cell(entry(ref, f"ref_{p}", w)) for w in ws)
            + f" | {target} |"
        )
    for name in variants:
        label = ours["configs"][name]["label"]
        cells = [mem_cell(entry(ours, name, w)) for w in ws]
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + " |" * len(ws) + " |")
    alone = [
        f"ref_{i}"
        for i in REFERENCE_INSTRUMENTS.values()
        if f"ref_{i}" in (ref.get("configs") or {})
    ]
    if alone:
        lines += [
            "",
            "## Cockpit 1.0.2: each instrument alone",
            "",
            "| instrument | " + " | ".join(ws) + " | memory " + " | memory ".join(ws) + " |",
            "|---|" + "---:|" * (2 * len(ws)),
        ]
        for name in alone:
            cells = [fmt_ratio(entry(ref, name, w)) if entry(ref, name, w) else "—" for w in ws]
            mems = [mem_cell(entry(ref, name, w)) for w in ws]
            label = ref["configs"][name]["label"]
            lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(mems) + " |")
    lines += ["", "## Absolute step times", "", *absolute_table([ours, ref], ws)]
    return "\n".join(lines) + "\n"


def _ratio(e: dict | None) -> float | None:
    return e["ratio_median"] if e and e.get("status") == "ok" else None


def _peak_gib(e: dict | None) -> float | None:
    mem = (e or {}).get("memory") or {}
    return (
        mem["peak_rss_mib"] / 1024 if mem.get("status") == "ok" and "peak_rss_mib" in mem else None
    )


def _plain_mem(suite: dict, w: str) -> str:
    m = (suite.get("plain_memory") or {}).get(w)
    if not m:
        return "—"
    if m.get("status") != "ok":
        return _status(m)
    return plain_mem_text(m, gib=True)


def _n(ours: dict, ref: dict, w: str, quick: bool = False) -> int:
    for suite in (ours, ref):
        for c in (suite.get("configs") or {}).values():
            e = c["results"].get(w)
            if e and "n" in e:
                return e["n"]
    return resolve_workload(w).batch_size(quick)


def absolute_table(suites: list[dict], ws: list[str]) -> list[str]:
    """Median ms per step, plain / configuration, block size k and CPU-time ratio."""
    lines = [
        "Median ms per step, plain / configuration (same process); steps per timed block k; "
        "median ratio of CPU time (`time.process_time`, all threads of the process: includes "
        "the log writer's background thread).",
        "",
        "| configuration | " + " | ".join(ws) + " |",
        "|---|" + "---:|" * len(ws),
    ]
    for suite in suites:
        for name, cfg in (suite.get("configs") or {}).items():
            cells = []
            for w in ws:
                e = entry(suite, name, w)
                if e and e.get("status") == "ok":
                    cells.append(
                        f"{e['plain_ms']:.1f} / {e['config_ms']:.1f} (k={e['k']}; "
                        f"CPU {e['cpu_ratio_median']:.2f}x)"
                    )
                else:
                    cells.append("—" if not e else _status(e))
            lines.append(f"| {cfg['label']} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_worker":
        if os.environ.get("COCKPIT_LIVE_REPO"):
            from benchmarks.bench_reference import _guard

            _guard()
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("use `python -m benchmarks presets` or `python -m benchmarks scaling`")
