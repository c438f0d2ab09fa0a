"""Engine benchmark: each first-order quantity's step time and memory vs a plain step.

Adding a configuration is one line in :data:`CONFIGS`, e.g. once curvature lands::

    engine_config("diag_ggn", "DiagGGN", [DiagGGN()]),
    Config("cockpit_economy", "Cockpit economy", cockpit_setup("economy")),

Run through ``python -m benchmarks engine`` (writes ``results/engine.json`` and
``results/engine.md``); ``python -m benchmarks.bench_engine _worker SPEC`` is the
measurement process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

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
from cockpit.engine import Engine
from cockpit.quantities import (
    FIRST_ORDER,
    BatchDot,
    BatchL2,
    GradDot,
    Hist1D,
    Hist2D,
    IndividualGradients,
    Projection,
    Quantity,
    SecondMoment,
    variance,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

PostFn = Callable[[object, Context], None]


def engine_config(
    name: str,
    label: str,
    quantities: Sequence[Quantity],
    *,
    post: PostFn | None = None,
    note: str = "",
) -> Config:
    """A configuration that gathers ``quantities`` with our :class:`Engine` every step.

    Args:
        name: Result key.
        label: Table label.
        quantities: Passed to :meth:`Engine.gather`; an empty list attaches the engine
            without gathering (the idle-hook overhead).
        post: ``post(gathered, ctx)`` run after the backward pass, inside the timed step
            (e.g. turning the second moment into the variance).
        note: Table footnote.
    """

    def setup(ctx: Context) -> StepFn:
        engine = Engine(ctx.model, ctx.loss_fn, fail_mode="error")
        opt = ctx.sgd()
        qs = list(quantities)
        directions = _directions(ctx) if any(isinstance(q, Projection) for q in qs) else None

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = ctx.loss()
            if not qs:
                loss.backward()
            else:
                with engine.gather(qs, directions=directions) as gathered:
                    loss.backward()
                if post is not None:
                    post(gathered, ctx)
            opt.step()

        return step

    return Config(name, label, setup, "ours", note)


def _directions(ctx: Context) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return {
        "u": {
            n: torch.randn(p.shape, generator=gen).to(ctx.device)
            for n, p in ctx.model.named_parameters()
        }
    }


def _variance(gathered, ctx: Context) -> None:
    """Variance = second moment / N - mean²; the mean is the batch gradient (mean loss)."""
    grads = {n: p.grad for n, p in ctx.model.named_parameters()}
    variance(gathered[SecondMoment()], grads, ctx.n)


def torch_func_setup(ctx: Context) -> StepFn:
    """Baseline: per-sample gradients with ``vmap(grad(...))``, their mean as ``p.grad``.

    The per-sample pass replaces the ordinary backward (it computes forward and backward
    for all samples), so this is a complete training step that also has the individual
    gradients.
    """
    from torch.func import functional_call, grad, vmap

    model, loss_fn = ctx.model, ctx.loss_fn
    params = dict(model.named_parameters())
    opt = ctx.sgd()

    def loss_one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        grads = per_sample({k: v.detach() for k, v in params.items()}, ctx.x, ctx.y)
        for k, p in params.items():
            p.grad = grads[k].mean(0)
        opt.step()

    return step


ALL_FIRST_ORDER = (*FIRST_ORDER, Projection(), Hist1D(), Hist2D())

#: Name → configuration. One line per configuration.
CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        PLAIN,
        engine_config("idle", "engine attached, not gathering", []),
        engine_config("batch_l2", "batch L2", [BatchL2()]),
        engine_config("gram", "Gram (BatchDot)", [BatchDot()]),
        engine_config("second_moment", "second moment", [SecondMoment()]),
        engine_config(
            "variance", "variance (second moment + mean)", [SecondMoment()], post=_variance
        ),
        engine_config("grad_dot", "grad dot", [GradDot()]),
        engine_config("projection", "projection", [Projection()]),
        engine_config("hist1d", "1D histogram", [Hist1D()]),
        engine_config("hist2d", "2D histogram", [Hist2D()]),
        engine_config(
            "first_order_all",
            "all first-order together",
            ALL_FIRST_ORDER,
            post=_variance,
            note="BatchL2, Gram, second moment + variance, grad dot, projection, 1D + 2D hist.",
        ),
        engine_config("individual_grads", "individual gradients", [IndividualGradients()]),
        Config(
            "torch_func",
            "torch.func vmap(grad)",
            torch_func_setup,
            "baseline",
            "per-sample gradients via vmap(grad(loss)) replace the backward; p.grad = mean.",
        ),
    )
}

#: BackPACK's ratios measured on this class of machine (CPU, 2 threads), A/B/C.
PRIOR: dict[str, tuple[float, float, float]] = {
    "batch_l2": (1.96, 1.69, 1.73),
    "second_moment": (2.26, 3.14, 3.85),
    "variance": (2.93, 5.13, 6.48),
    "torch_func": (11.9, 1.86, 1.23),
}
#: Our configuration → measured reference configuration (bench_reference) beside it.
REFERENCE_OF: dict[str, str] = {
    "batch_l2": "backpack_batch_l2",
    "second_moment": "backpack_sum_grad_squared",
    "variance": "backpack_variance",
    "individual_grads": "backpack_batch_grad",
    "torch_func": "opacus_grad_sample",
}
SINGLE_QUANTITIES = (
    "batch_l2",
    "gram",
    "second_moment",
    "variance",
    "grad_dot",
    "projection",
    "hist1d",
    "hist2d",
)
#: Targets: (configurations, workloads, max time ratio).
TIME_TARGETS = ((SINGLE_QUANTITIES, ("B", "C"), 1.5), (("first_order_all",), ("A", "B", "C"), 1.8))
#: Memory target: step footprint ≤ 1.5x a plain step on B, for every first-order config.
MEMORY_TARGET = ((*SINGLE_QUANTITIES, "first_order_all"), ("B",), 1.5)


def launcher(src: Path = ROOT) -> Launcher:
    """Workers run with this interpreter from ``src`` (its ``cockpit`` shadows the editable one)."""
    return Launcher(sys.executable, "benchmarks.bench_engine", str(src))


@contextmanager
def source_snapshot(use_head: bool = True) -> Iterator[tuple[Path, dict]]:
    """A frozen copy of ``cockpit/`` and ``benchmarks/`` at ``HEAD`` to run the workers from.

    Others edit the working tree while a long benchmark runs; measuring the committed
    engine keeps every configuration on the same code and says which code it was.
    Falls back to the working tree when ``git archive`` is unavailable.
    """

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or None
    # COCKPIT_BENCH_SOURCE=worktree: measure the files as they are (a copied tree whose
    # .git may not match them, e.g. on a lent GPU machine)
    use_head = use_head and os.environ.get("COCKPIT_BENCH_SOURCE") != "worktree"
    if use_head and commit:
        with tempfile.TemporaryDirectory(prefix="cockpit-bench-src-") as tmp:
            tar = Path(tmp) / "src.tar"
            proc = subprocess.run(
                ["git", "archive", "--format=tar", "-o", str(tar), "HEAD", "cockpit", "benchmarks"],
                cwd=ROOT,
                capture_output=True,
            )
            if proc.returncode == 0:
                with tarfile.open(tar) as tf:
                    tf.extractall(tmp, filter="data")
                yield Path(tmp), {"git_commit": commit, "source": "git archive HEAD"}
                return
    dirty = bool(git("status", "--porcelain", "--", "cockpit"))
    yield ROOT, {"git_commit": commit, "source": "working tree" + (" (dirty)" if dirty else "")}


def run(
    opts: Options,
    workloads: Iterable[str] = tuple(WORKLOADS),
    names: Iterable[str] | None = None,
    out_dir: Path = RESULTS,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the engine suite, write ``engine.json`` / ``engine.md`` and return the JSON.

    With a subset of configurations (``names``), results are merged into an existing
    ``engine.json`` (so a new configuration can be measured on its own).
    """
    workloads = list(workloads)
    chosen = [CONFIGS[n] for n in (names or CONFIGS)]
    log(f"engine benchmark: {len(chosen)} configurations on {workloads} ({_mode(opts)})")
    with source_snapshot() as (src, meta):
        log(f"  measuring cockpit/ from {meta['source']} ({meta['git_commit']})")
        suite = run_suite(chosen, workloads, opts, launcher(src), log, meta).to_json()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "engine.json"
    if names and path.exists():
        old = json.loads(path.read_text())
        for name, entry in suite["configs"].items():
            kept = old["configs"].get(name)
            if kept is None:
                old["configs"][name] = entry
                continue
            # merge per workload: a run on --workloads A must not drop B and C
            for w, result in entry.get("results", {}).items():
                previous = kept.setdefault("results", {}).get(w) or {}
                if "memory" not in result and "memory" in previous:  # a --no-memory run
                    for key in ("memory", "rss_growth_mib", "mem_ratio"):
                        if key in previous:
                            result[key] = previous[key]
                kept["results"][w] = result
        old.setdefault("partial_runs", []).append(suite["meta"])
        suite = old
    path.write_text(json.dumps(suite, indent=1))
    write_markdown(out_dir)
    log(f"wrote {path} and {out_dir / 'engine.md'}")
    return suite


def _mode(opts: Options) -> str:
    return f"{'quick' if opts.quick else 'full'}, {opts.reps} reps, device {opts.device}"


# --------------------------------------------------------------------- Markdown
def _entry(suite: dict | None, name: str, w: str) -> dict | None:
    if not suite:
        return None
    return suite.get("configs", {}).get(name, {}).get("results", {}).get(w)


def _target_for(name: str) -> list[tuple[tuple[str, ...], float]]:
    return [(ws, limit) for names, ws, limit in TIME_TARGETS if name in names]


def _check(entry: dict | None, limit: float, key: str = "ratio_median") -> str:
    if not entry or entry.get("status") != "ok" or key not in entry:
        return "?"
    return "✓" if entry[key] <= limit else "✗"


def render_markdown(engine: dict, reference: dict | None = None) -> str:
    """The engine table (with BackPACK's prior ratios and measured references beside it)."""
    meta = engine["meta"]
    ws = [w for w in WORKLOADS if any(_entry(engine, n, w) for n in engine["configs"])]
    opts = meta.get("options", {})
    lines = [
        "# Engine benchmark",
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
        + " Generated by `python -m benchmarks engine`; do not edit by hand.",
        "",
        f"- machine: {meta.get('cpu_model', '?')}, {meta.get('cpu_count')} CPUs, "
        f"`torch.set_num_threads({meta.get('num_threads')})`, torch {meta.get('torch')}, "
        f"device {meta.get('device')}",
        f"- date: {meta.get('date')}; load average at start {_load(meta.get('loadavg_start'))}, "
        f"at end {_load(meta.get('loadavg_end'))}; engine measured at commit "
        f"{meta.get('git_commit')} ({meta.get('source', '?')})",
        "- workloads: "
        + "; ".join(f"{w} = {WORKLOADS[w].name}, N={_n(engine, w) or WORKLOADS[w].n}" for w in ws),
        "- BackPACK (prior): ratios measured earlier for BackPACK on this class of machine "
        "(CPU, 2 threads). BackPACK (here): measured in this harness by "
        "`python -m benchmarks reference`"
        + (f" on {reference['meta'].get('date')}" if reference else " (not run yet)")
        + ".",
        "",
        "## Time",
        "",
        "| configuration | "
        + " | ".join(f"{w} ours" for w in ws)
        + " | BackPACK prior "
        + "/".join(ws)
        + " | reference here "
        + "/".join(ws)
        + " | target |",
        "|---|" + "---:|" * len(ws) + "---|---|---|",
    ]
    for name, cfg in engine["configs"].items():
        cells = [fmt_ratio(_entry(engine, name, w)) for w in ws]
        prior = PRIOR.get(name)
        prior_txt = (
            "/".join(f"{v:g}" for w, v in zip("ABC", prior, strict=True) if w in ws)
            if prior
            else ""
        )
        ref_name = REFERENCE_OF.get(name)
        ref_txt = ""
        if ref_name and reference and ref_name in reference.get("configs", {}):
            ref_txt = "/".join(fmt_ratio(_entry(reference, ref_name, w), spread=False) for w in ws)
            ref_txt += f" ({reference['configs'][ref_name]['label']})"
        targets = []
        for t_ws, limit in _target_for(name):
            marks = "".join(_check(_entry(engine, name, w), limit) for w in t_ws if w in ws)
            targets.append(f"≤{limit}x on {','.join(t_ws)}: {marks}")
        lines.append(
            f"| {cfg['label']} | "
            + " | ".join(cells)
            + f" | {prior_txt} | {ref_txt} | "
            + "; ".join(targets)
            + " |"
        )
    notes = [f"- *{c['label']}*: {c['note']}" for c in engine["configs"].values() if c.get("note")]
    if notes:
        lines += ["", *notes]
    lines += _memory_section(engine, ws)
    if reference:
        lines += ["", "## Reference packages measured here", "", *reference_table(reference, ws)]
    lines += _timing_section(engine, ws)
    return "\n".join(lines) + "\n"


def _load(v: list | None) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def _n(suite: dict, w: str) -> int | None:
    for c in suite["configs"].values():
        e = c["results"].get(w)
        if e and "n" in e:
            return e["n"]
    return None


def _mem_cell(entry: dict | None) -> str:
    if not entry:
        return "—"
    if entry.get("status") != "ok":
        return entry.get("status", "?")
    mem = entry.get("memory")
    if not mem:
        return "—"
    if mem.get("status") != "ok":
        return mem["status"]
    if "step_rss_mib" not in mem:  # one-process CUDA run: no RSS
        text = f"CUDA {mem.get('cuda_step_mib', float('nan')):.0f} MiB"
        if "cuda_mem_ratio" in entry:
            text += f" ({entry['cuda_mem_ratio']:.2f}x)"
        return text
    text = f"{mem['step_rss_mib']:.0f} MiB"
    if "mem_ratio" in entry:
        text += f" ({entry['mem_ratio']:.2f}x, {entry['rss_growth_mib']:+.0f})"
    if "cuda_mem_ratio" in entry:
        text += f"; CUDA {mem['cuda_step_mib']:.0f} MiB ({entry['cuda_mem_ratio']:.2f}x)"
    return text


def _memory_section(suite: dict, ws: list[str]) -> list[str]:
    plain = suite.get("plain_memory") or {}
    if not plain:
        return []
    lines = [
        "",
        "## Memory",
        "",
        "Footprint of a step (peak RSS of a fresh process running only this configuration "
        "minus its RSS before the first step): MiB (ratio to the plain step's footprint, "
        "peak-RSS growth over the plain process in MiB).",
        "",
        "| configuration | " + " | ".join(ws) + " | target |",
        "|---|" + "---:|" * len(ws) + "---|",
        "| plain step | "
        + " | ".join(
            plain_mem_text(plain[w])
            if plain.get(w, {}).get("status") == "ok"
            else plain.get(w, {}).get("status", "—")
            for w in ws
        )
        + " | |",
    ]
    names, t_ws, limit = MEMORY_TARGET
    for name, cfg in suite["configs"].items():
        if name == "plain":
            continue
        target = ""
        if name in names:
            target = f"≤{limit}x on {','.join(t_ws)}: " + "".join(
                _check(_entry(suite, name, w), limit, "mem_ratio") for w in t_ws if w in ws
            )
        cells = [_mem_cell(_entry(suite, name, w)) for w in ws]
        lines.append(f"| {cfg['label']} | " + " | ".join(cells) + f" | {target} |")
    return lines


def _timing_section(suite: dict, ws: list[str]) -> list[str]:
    lines = [
        "",
        "## Absolute step times",
        "",
        "Median ms per step, plain / configuration (same process); steps per timed block k; "
        "median ratio of *CPU* time (`time.process_time`, less sensitive to other processes "
        "on the machine than the wall-clock ratio above).",
        "",
        "| configuration | " + " | ".join(ws) + " |",
        "|---|" + "---:|" * len(ws),
    ]
    for name, cfg in suite["configs"].items():
        cells = []
        for w in ws:
            e = _entry(suite, name, w)
            if e and e.get("status") == "ok":
                cpu = f"; CPU {e['cpu_ratio_median']:.2f}x" if "cpu_ratio_median" in e else ""
                cells.append(f"{e['plain_ms']:.1f} / {e['config_ms']:.1f} (k={e['k']}{cpu})")
            else:
                cells.append("—" if not e else e.get("status", "?"))
        lines.append(f"| {cfg['label']} | " + " | ".join(cells) + " |")
    return lines


def reference_table(reference: dict, ws: list[str]) -> list[str]:
    """Markdown rows for the measured reference configurations."""
    env = reference.get("meta", {}).get("reference_env", {})
    versions = ", ".join(
        f"{k} {v['version']}" for k, v in env.items() if isinstance(v, dict) and "version" in v
    )
    lines = [
        f"Same harness, run in `.bench-venv` ({versions or 'versions unknown'}).",
        "",
        "| configuration | " + " | ".join(ws) + " | memory B |",
        "|---|" + "---:|" * len(ws) + "---:|",
    ]
    for name, cfg in reference.get("configs", {}).items():
        cells = [fmt_ratio(_entry(reference, name, w)) for w in ws]
        lines.append(
            f"| {cfg['label']} | "
            + " | ".join(cells)
            + f" | {_mem_cell(_entry(reference, name, 'B'))} |"
        )
    notes = [
        f"- *{c['label']}*: {c['note']}" for c in reference["configs"].values() if c.get("note")
    ]
    return lines + ([""] + notes if notes else [])


def write_markdown(out_dir: Path = RESULTS) -> Path | None:
    """(Re)write ``engine.md`` from ``engine.json`` and, if present, ``reference.json``."""
    path = out_dir / "engine.json"
    if not path.exists():
        return None
    engine = json.loads(path.read_text())
    ref_path = out_dir / "reference.json"
    reference = json.loads(ref_path.read_text()) if ref_path.exists() else None
    md = out_dir / "engine.md"
    md.write_text(render_markdown(engine, reference))
    return md


# ---------------------------------------------------------------------- profiling
def profile(name: str, workload: str, steps: int = 3, rows: int = 25) -> str:
    """Profile ``steps`` steps of a configuration with torch.profiler and cProfile.

    Returns:
        Two text tables: operators by self CPU time, Python functions by cumulative time.
    """
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from benchmarks.harness import NUM_THREADS, _context
    from benchmarks.workloads import get

    torch.set_num_threads(NUM_THREADS)
    wl = get(workload)
    step = CONFIGS[name].setup(_context(wl, wl.model(), Options()))
    step()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    ops = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40
    )
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(rows)
    return f"== {name} on {workload} (N={wl.n}), {steps} steps\n{ops}\n{buf.getvalue()}"


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "profile":
        # python -m benchmarks.bench_engine profile CONFIG WORKLOAD [STEPS]
        print(profile(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])))
        sys.exit(0)
    rc = worker_cli(CONFIGS)
    if rc is None:
        sys.exit(
            "usage: python -m benchmarks engine (benchmark) | "
            "python -m benchmarks.bench_engine profile CONFIG WORKLOAD [STEPS]"
        )
    sys.exit(rc)
