"""Reference benchmark: BackPACK and Opacus in the same harness, inside ``.bench-venv``.

The parent (``python -m benchmarks reference``, in ``.venv``) builds/checks
``.bench-venv`` (:mod:`benchmarks.reference_env`), copies the torch-only modules
``benchmarks/{__init__,workloads,harness,bench_reference}.py`` into a temporary
directory and starts every measurement as ``.bench-venv/bin/python -m
benchmarks.bench_reference _worker SPEC`` *from that directory*: our repository is
not on ``sys.path`` there (checked), so ``import cockpit`` would be Cockpit 1.0.2, and
nothing of ours can shadow the reference packages. Plain and reference steps run
interleaved in the same process, exactly as for our engine.

Adding a configuration is one line in :data:`CONFIGS`, e.g. for curvature::

    backpack_config("backpack_diag_ggn", "BackPACK DiagGGNExact", "DiagGGNExact"),
    backpack_config("backpack_diag_ggn_mc", "BackPACK DiagGGNMC", "DiagGGNMC"),
    backpack_config("backpack_diag_hessian", "BackPACK DiagHessian", "DiagHessian"),

(extensions are named by their class in ``backpack.extensions`` and only imported
in the worker, so this module stays importable in ``.venv``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.harness import Config, Context, Launcher, Options, StepFn, run_suite, worker_cli
from benchmarks.workloads import WORKLOADS

HERE = Path(__file__).resolve().parent
#: Files the reference worker needs (torch + standard library only).
WORKER_FILES = ("__init__.py", "workloads.py", "harness.py", "bench_reference.py")
_REPO_ENV = "COCKPIT_LIVE_REPO"


def backpack_config(name: str, label: str, *extensions: str, note: str = "") -> Config:
    """BackPACK: ``extend`` model and loss, ``with backpack(*extensions): loss.backward()``.

    Args:
        name: Result key.
        label: Table label.
        extensions: Class names in ``backpack.extensions`` (e.g. ``"BatchL2Grad"``).
        note: Table footnote.
    """

    def setup(ctx: Context) -> StepFn:
        import backpack
        import backpack.extensions as ext

        model = backpack.extend(ctx.model)
        loss_fn = backpack.extend(ctx.loss_fn)
        exts = [getattr(ext, e)() for e in extensions]
        opt = ctx.sgd(model)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(ctx.x), ctx.y)
            with backpack.backpack(*exts):
                loss.backward()
            opt.step()

        return step

    return Config(name, label, setup, "reference", note)


def opacus_setup(ctx: Context) -> StepFn:
    """Opacus ``GradSampleModule`` (hooks): ``p.grad_sample`` for every parameter."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(ctx.model, loss_reduction="mean")
    opt = ctx.sgd(gsm)

    def step() -> None:
        gsm.zero_grad(set_to_none=True)  # also clears grad_sample
        ctx.loss_fn(gsm(ctx.x), ctx.y).backward()
        opt.step()

    return step


#: Name → configuration. One line per configuration.
CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        backpack_config("backpack_batch_l2", "BackPACK BatchL2Grad", "BatchL2Grad"),
        backpack_config("backpack_sum_grad_squared", "BackPACK SumGradSquared", "SumGradSquared"),
        backpack_config("backpack_variance", "BackPACK Variance", "Variance"),
        backpack_config("backpack_batch_grad", "BackPACK BatchGrad", "BatchGrad"),
        backpack_config(
            "backpack_first_order",
            "BackPACK BatchGrad+BatchL2Grad+SumGradSquared+Variance",
            "BatchGrad",
            "BatchL2Grad",
            "SumGradSquared",
            "Variance",
            note="the four first-order extensions in one backward pass.",
        ),
        Config("opacus_grad_sample", "Opacus GradSampleModule", opacus_setup, "reference"),
    )
}


def _copy_worker_files(dest: Path, extra: Iterable[str] = ()) -> Path:
    """Copy :data:`WORKER_FILES` (and ``extra`` torch-only modules) to ``dest/benchmarks``."""
    pkg = dest / "benchmarks"
    pkg.mkdir()
    for name in (*WORKER_FILES, *extra):
        shutil.copy2(HERE / name, pkg / name)
    return pkg


def run(
    opts: Options,
    workloads: Iterable[str] = tuple(WORKLOADS),
    names: Iterable[str] | None = None,
    out_dir: Path = HERE / "results",
    log: Callable[[str], None] = print,
) -> dict:
    """Run the reference suite; write ``reference.json`` / ``reference.md``, refresh ``engine.md``.

    With a subset of configurations, results are merged into an existing ``reference.json``.
    """
    from benchmarks import bench_engine, reference_env

    workloads = list(workloads)
    chosen = [CONFIGS[n] for n in (names or CONFIGS)]
    info = reference_env.ensure(log=log)
    if not info.get("ok"):
        raise RuntimeError(f"the reference environment is broken: {info}")
    info.pop("sys_path", None)
    mode = f"{'quick' if opts.quick else 'full'}, {opts.reps} reps"
    log(f"reference benchmark: {len(chosen)} configurations on {workloads} ({mode})")
    with tempfile.TemporaryDirectory(prefix="cockpit-bench-ref-") as tmp:
        _copy_worker_files(Path(tmp))
        env = reference_env.clean_env()
        env[_REPO_ENV] = str(HERE.parent)
        launcher = Launcher(str(reference_env.python()), "benchmarks.bench_reference", tmp, env)
        suite = run_suite(chosen, workloads, opts, launcher, log, {"reference_env": info})
    result = suite.to_json()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "reference.json"
    if names and path.exists():
        old = json.loads(path.read_text())
        old["configs"].update(result["configs"])
        old.setdefault("partial_runs", []).append(result["meta"])
        result = old
    path.write_text(json.dumps(result, indent=1))
    ws = [w for w in WORKLOADS if w in workloads]
    lines = [
        "# Reference benchmark",
        "",
        "Generated by `python -m benchmarks reference`"
        + (" --quick" if opts.quick else "")
        + f" on {result['meta'].get('date')} ({result['meta'].get('cpu_model', '?')}, "
        f"{result['meta'].get('num_threads')} threads); median ratio to a plain step "
        "(min–max), interleaved in the same process.",
        "",
        *bench_engine.reference_table(result, ws),
    ]
    (out_dir / "reference.md").write_text("\n".join(lines) + "\n")
    bench_engine.write_markdown(out_dir)
    log(f"wrote {path}, {out_dir / 'reference.md'} (and refreshed engine.md if present)")
    return result


def _guard() -> None:
    """In a worker: our repository must not be importable (the ``cockpit`` name clash)."""
    repo = os.environ.get(_REPO_ENV)
    if not repo:
        return
    repo_path = Path(repo).resolve()
    for entry in sys.path:
        if Path(entry or os.getcwd()).resolve() == repo_path:
            raise RuntimeError(f"the repository {repo} is on sys.path of the reference worker")
    if Path(__file__).resolve().is_relative_to(repo_path):
        raise RuntimeError("the reference worker runs from the repository, not a copy")


if __name__ == "__main__":
    _guard()
    rc = worker_cli(CONFIGS)
    if rc is None:
        sys.exit(
            "use `python -m benchmarks reference`; this module's CLI is the worker entry point"
        )
    sys.exit(rc)
