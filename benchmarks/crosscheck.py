"""Numerical cross-check against Cockpit 1.0.2: both sides of the comparison.

Our ``cockpit`` and Cockpit 1.0.2 (``cockpit-for-pytorch``) share the import name, so
each side runs in its own process and they exchange files in one directory:

1. :func:`write_inputs` (any process with torch) saves, for every case of
   :data:`CASES`, the initial model state and the batches of every step
   (``<case>.pt``, float64).
2. ``.venv/bin/python -m benchmarks.crosscheck ours DIR`` (from the repository) trains
   each case for :data:`STEPS` steps of vanilla SGD with our public
   :class:`cockpit.Cockpit` once per preset of :data:`RUNS`, logging to a run
   directory, reads the log back (:func:`cockpit.logreader.read_log`,
   ``read_histograms``) and writes ``<case>.<run>.ours.json``. It also writes the exact
   largest-magnitude eigenvalue of each step's Hessian (from the explicit Hessian) for
   the max-eigenvalue tolerance check.
3. ``.bench-venv/bin/python -m benchmarks.crosscheck reference DIR``, started from a
   temporary copy of ``benchmarks/{__init__,crosscheck}.py`` (our repository is not on
   its ``sys.path``, checked), does the same with Cockpit 1.0.2's documented usage
   (BackPACK-extended model and loss, ``info`` with individual losses, batch size,
   optimizer and loss, ``backward(create_graph=cockpit.create_graph(step))``) and
   writes ``<case>.<run>.reference.json`` from ``Cockpit.get_output()``.

:func:`run_both` does all three; ``benchmarks/test_crosscheck.py`` compares the JSON.
This module imports only torch and the standard library at module level, so it also
runs inside ``.bench-venv``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_REPO_ENV = "COCKPIT_LIVE_REPO"

#: Steps of vanilla SGD per run: steps 0..STEPS-1 (alpha and update_size of the
#: last step need a step after it in Cockpit 1.0.2, so they exist for 0..STEPS-2).
STEPS = 3
LR = 0.3
N = 16
#: Run name → (our instruments (a preset name or a list), Cockpit 1.0.2 quantity classes).
#: ``extra`` are the instruments of Cockpit 1.0.2 that none of its presets contains.
RUNS: dict[str, tuple[str | list[str], list[str]]] = {
    "economy": (
        "economy",
        [
            "Alpha",
            "Distance",
            "GradHist1d",
            "GradNorm",
            "InnerTest",
            "Loss",
            "NormTest",
            "OrthoTest",
            "UpdateSize",
        ],
    ),
    "business": ("business", ["@economy", "TICDiag", "HessTrace"]),
    "full": ("full", ["@business", "HessMaxEV", "GradHist2d"]),
    "extra": (
        ["mean_gsnr", "early_stopping", "cabs", "tic_trace"],
        ["MeanGSNR", "EarlyStopping", "CABS", "TICTrace"],
    ),
}


# ------------------------------------------------------------------------ cases
def mlp() -> nn.Sequential:
    """MLP 12-16-10-5 with sigmoid and tanh: the diagonal Hessian has residual terms."""
    return nn.Sequential(
        nn.Linear(12, 16), nn.Sigmoid(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 5)
    )


def cnn() -> nn.Sequential:
    """Small CNN on 3×8×8: conv, ReLU, max-pool, padded conv, ReLU, dense (piecewise linear)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(54, 5),
    )


#: Case → (model constructor, input shape of one sample, classes).
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (mlp, (12,), 5),
    "cnn": (cnn, (3, 8, 8), 5),
}


def write_inputs(directory: Path) -> None:
    """Save each case's initial float64 state and the batches of its :data:`STEPS` steps."""
    for name, (build, shape, classes) in CASES.items():
        torch.manual_seed(0)
        model = build().to(torch.float64)
        gen = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(STEPS):
            x = 2.0 * torch.randn(N, *shape, generator=gen, dtype=torch.float64)
            y = torch.randint(0, classes, (N,), generator=gen)
            batches.append((x, y))
        torch.save({"state": model.state_dict(), "batches": batches}, directory / f"{name}.pt")


def _load_case(directory: Path, name: str) -> tuple[nn.Module, list]:
    data = torch.load(directory / f"{name}.pt")
    model = CASES[name][0]().to(torch.float64)
    model.load_state_dict(data["state"])
    return model, data["batches"]


def _jsonable(value):
    """Numpy arrays, tensors and numpy scalars → lists and floats (recursively)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return float(value)


# ------------------------------------------------------------------------- ours
def run_ours(directory: Path) -> None:
    """Our side (in ``.venv``): every case × run of :data:`RUNS` through the public API."""
    import cockpit
    from cockpit import Cockpit
    from cockpit.logreader import read_histograms, read_log

    if not Path(cockpit.__file__).resolve().is_relative_to(ROOT):
        raise RuntimeError(f"'cockpit' is not this repository's: {cockpit.__file__}")
    torch.set_default_dtype(torch.float64)
    for case in CASES:
        thetas: list[dict[str, torch.Tensor]] = []
        for run, (instruments, _) in RUNS.items():
            model, batches = _load_case(directory, case)
            loss_fn = nn.CrossEntropyLoss()
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            logdir = directory / f"{case}.{run}.log"
            record = not thetas
            with Cockpit(model, loss_fn, opt, instruments=instruments, logdir=logdir) as cp:
                for step, (x, y) in enumerate(batches):
                    if record:
                        thetas.append({k: p.detach().clone() for k, p in model.named_parameters()})
                    opt.zero_grad()
                    loss = loss_fn(model(x), y)
                    with cp.step(step, loss):
                        loss.backward()
                    opt.step()
                inst_names = [i.name for i in cp.instruments]
            scalars = read_log(logdir)
            hists = read_histograms(logdir)
            out = {
                "instruments": inst_names,
                "params": [k for k, _ in model.named_parameters()],
                "scalars": [
                    [int(r.step), r.instrument, r.metric, r.param, float(r.value)]
                    for r in scalars.itertuples()
                ],
                "histograms": [
                    [
                        int(r.step),
                        r.instrument,
                        r.param,
                        _jsonable(r.counts),
                        _jsonable(r.edges_0),
                        _jsonable(r.edges_1),
                    ]
                    for r in hists.itertuples()
                ],
            }
            (directory / f"{case}.{run}.ours.json").write_text(json.dumps(out))
        exact = {
            str(step): _exact_max_ev(case, theta, *batches[step])
            for step, theta in enumerate(thetas)
        }
        (directory / f"{case}.exact.json").write_text(json.dumps({"hess_max_ev": exact}))


def _exact_max_ev(case: str, theta: dict[str, torch.Tensor], x, y) -> float:
    """Largest-magnitude eigenvalue of the explicit Hessian of the batch loss at θ."""
    from torch.func import functional_call

    model = CASES[case][0]().to(torch.float64)  # a fresh module: no hooks of anyone
    names = list(theta)
    shapes = [theta[k].shape for k in names]
    sizes = [theta[k].numel() for k in names]
    flat = torch.cat([theta[k].reshape(-1) for k in names])
    loss_fn = nn.CrossEntropyLoss()

    def loss(vec: torch.Tensor) -> torch.Tensor:
        parts = torch.split(vec, sizes)
        params = {k: p.reshape(s) for k, p, s in zip(names, parts, shapes, strict=True)}
        return loss_fn(functional_call(model, params, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss, flat)
    evals = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
    return float(evals[evals.abs().argmax()])


# -------------------------------------------------------------------- reference
def _reference_quantities(run: str) -> list[str]:
    names: list[str] = []
    for q in RUNS[run][1]:
        names += _reference_quantities(q[1:]) if q.startswith("@") else [q]
    return names


def run_reference(directory: Path) -> None:
    """Cockpit 1.0.2's side (in ``.bench-venv``), with its documented training-loop usage."""
    from backpack import extend
    from cockpit.utils.schedules import linear

    import cockpit
    from cockpit import Cockpit, quantities

    repo = os.environ.get(_REPO_ENV)
    if repo and Path(cockpit.__file__).resolve().is_relative_to(Path(repo).resolve() / "cockpit"):
        raise RuntimeError(f"'cockpit' resolves to our repository: {cockpit.__file__}")
    for entry in sys.path:
        if repo and Path(entry or os.getcwd()).resolve() == Path(repo).resolve():
            raise RuntimeError(f"the repository {repo} is on sys.path of the reference side")
    torch.set_default_dtype(torch.float64)
    for case in CASES:
        for run in RUNS:
            model, batches = _load_case(directory, case)
            model = extend(model)
            loss_fn = extend(nn.CrossEntropyLoss())
            individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            qs = []
            for q in _reference_quantities(run):
                kwargs = {"keep_individual": True} if q == "GradHist2d" else {}
                qs.append(getattr(quantities, q)(track_schedule=linear(1), **kwargs))
            cp = Cockpit(model.parameters(), quantities=qs)
            for step, (x, y) in enumerate(batches):
                torch.manual_seed(100 + step)  # the power iteration's random start
                opt.zero_grad()
                outputs = model(x)
                loss = loss_fn(outputs, y)
                losses = individual_loss_fn(outputs, y)
                info = {
                    "batch_size": x.shape[0],
                    "individual_losses": losses,
                    "loss": loss,
                    "optimizer": opt,
                }
                with cp(step, info=info):
                    loss.backward(create_graph=cp.create_graph(step))
                opt.step()
            output = {str(step): _jsonable(v) for step, v in cp.get_output().items()}
            versions = {"cockpit": _version("cockpit-for-pytorch")}
            versions["backpack"] = _version("backpack-for-pytorch")
            versions["torch"] = torch.__version__
            out = {"output": output, "versions": versions}
            (directory / f"{case}.{run}.reference.json").write_text(json.dumps(out))


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


# ---------------------------------------------------------------------- driver
def run_both(directory: Path, timeout_s: float = 600.0) -> dict:
    """Write the inputs and run both sides, each in its own process.

    Ours runs with this interpreter from the repository, Cockpit 1.0.2 with
    ``.bench-venv``'s from a temporary copy of this module.

    Raises:
        FileNotFoundError: When ``.bench-venv`` has no working Cockpit 1.0.2 (see
            :mod:`benchmarks.reference_env`).
        RuntimeError: When a side fails (its stderr is in the message).
    """
    from benchmarks import reference_env

    info = reference_env.check()
    if not info.get("ok"):
        raise FileNotFoundError(
            f"the reference environment {reference_env.VENV} is missing or broken "
            f"({info.get('error') or info.get('cockpit')}); build it with "
            "`.venv/bin/python -m benchmarks.reference_env`"
        )
    directory = Path(directory)
    write_inputs(directory)
    _run(
        [sys.executable, "-m", "benchmarks.crosscheck", "ours", str(directory)],
        ROOT,
        None,
        timeout_s,
    )
    with tempfile.TemporaryDirectory(prefix="cockpit-crosscheck-ref-") as tmp:
        pkg = Path(tmp) / "benchmarks"
        pkg.mkdir()
        for name in ("__init__.py", "crosscheck.py"):
            shutil.copy2(HERE / name, pkg / name)
        env = reference_env.clean_env()
        env[_REPO_ENV] = str(ROOT)
        cmd = [str(reference_env.python()), "-m", "benchmarks.crosscheck", "reference"]
        _run([*cmd, str(directory)], Path(tmp), env, timeout_s)
    info.pop("sys_path", None)
    return {"directory": str(directory), "reference_env": info}


def _run(cmd: list[str], cwd: Path, env: dict | None, timeout_s: float) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[1:4])} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.crosscheck ours|reference DIR``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("ours", "reference"):
        print(
            "usage: python -m benchmarks.crosscheck ours|reference DIR "
            "(run through `python -m benchmarks crosscheck`)",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    (run_ours if argv[0] == "ours" else run_reference)(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
