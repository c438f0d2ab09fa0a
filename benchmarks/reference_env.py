"""The separate virtual environment ``.bench-venv/`` for the reference packages.

BackPACK (``backpack-for-pytorch``), Opacus and Cockpit 1.0.2 (``cockpit-for-pytorch``)
are measured against our engine, but they must never be installed into ``.venv``:
Cockpit 1.0.2's import name ``cockpit`` clashes with ours. They live in
``.bench-venv/`` (gitignored) and are only ever run as subprocesses of
``.bench-venv/bin/python`` from a temporary directory, so our repository is not on
their ``sys.path`` (see :mod:`benchmarks.bench_reference`).

How the environment is built (and why):

- ``torch==2.13.0`` first, the CPU build from local disk (``/opt/wheels`` or the
  directories in ``PIP_FIND_LINKS``) when a wheel is there, else the pinned spec as the
  Makefile installs it. Never an unpinned ``torch``: that pulls a multi-GB CUDA build.
- The packages that depend on torch are installed with ``--no-deps`` so pip can never
  replace the CPU torch. Their real runtime dependencies, read from the wheels'
  METADATA (``pip download --no-deps`` + ``*.dist-info/METADATA``) and their imports,
  are installed explicitly:

  ========================  =============================================================
  backpack-for-pytorch      einops, unfoldNd (→ numpy, packaging). Its declared
                            ``torchvision`` dependency is only imported by
                            ``backpack.utils.examples`` (MNIST loaders), so it is left
                            out: the registry's torchvision does not match our torch.
  opacus                    numpy, scipy, opt-einsum
  cockpit-for-pytorch       json-tricks, matplotlib, numpy, pandas, scipy, seaborn,
                            backpack-for-pytorch; ``cockpit/__init__.py`` imports
                            ``pkg_resources``, hence ``setuptools<81``.
  ========================  =============================================================

Usage::

    .venv/bin/python -m benchmarks.reference_env            # build if missing, then check
    .venv/bin/python -m benchmarks.reference_env --rebuild  # from scratch

On a machine where no environment can be built (a GPU machine without a package
registry, whose own interpreter has a CUDA torch), the reference packages can be put on
a path of their own and named instead: ``COCKPIT_BENCH_REF_PYTHON`` (the interpreter,
e.g. ``python3``) and ``COCKPIT_BENCH_REF_PATH`` (``PYTHONPATH`` for the workers, holding
backpack, unfoldNd, opacus, cockpit-for-pytorch and json_tricks, never this repository).
Then nothing is built, and the check records that interpreter's torch instead of
requiring the pinned CPU build.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".bench-venv"
TORCH_VERSION = "2.13.0"

#: Depend on torch: installed with ``--no-deps`` (pinned: the versions measured).
NO_DEPS = (
    "backpack-for-pytorch==1.7.1",
    "unfoldNd==0.2.3",
    "opacus==1.6.0",
    "cockpit-for-pytorch==1.0.2",
)
#: Their real runtime dependencies (none of them depends on torch).
DEPS = (
    "einops>=0.3,<1",
    "packaging",
    "numpy",
    "scipy>=1.2",
    "opt-einsum>=3.3",
    "matplotlib>=3.4",
    "pandas",
    "seaborn",
    "json-tricks",
    "setuptools<81",
)
#: Import name → distribution, checked after installing.
IMPORTS = {
    "torch": "torch",
    "backpack": "backpack-for-pytorch",
    "opacus": "opacus",
    "cockpit": "cockpit-for-pytorch",
}


#: Override: the reference workers' interpreter and their ``PYTHONPATH`` (module docstring).
PYTHON_ENV, PATH_ENV = "COCKPIT_BENCH_REF_PYTHON", "COCKPIT_BENCH_REF_PATH"


def overridden() -> bool:
    """Whether the reference interpreter is named by ``COCKPIT_BENCH_REF_PYTHON``."""
    return bool(os.environ.get(PYTHON_ENV))


def python() -> Path:
    """The reference environment's interpreter (it may not exist yet)."""
    if overridden():
        found = shutil.which(os.environ[PYTHON_ENV])
        return Path(found or os.environ[PYTHON_ENV])
    return VENV / "bin" / "python"


def clean_env() -> dict[str, str]:
    """Environment for reference subprocesses: no PYTHONPATH, no user site, 2 threads.

    With the override, ``PYTHONPATH`` is ``COCKPIT_BENCH_REF_PATH`` and nothing else.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if overridden() and os.environ.get(PATH_ENV):
        env["PYTHONPATH"] = os.environ[PATH_ENV]
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("MKL_NUM_THREADS", "2")
    return env


def _local_torch_wheel() -> str | None:
    dirs = ["/opt/wheels", *os.environ.get("PIP_FIND_LINKS", "").split()]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for d in dirs:
        d = d.removeprefix("file://")
        hits = sorted(glob.glob(os.path.join(d, f"torch-{TORCH_VERSION}+cpu-{tag}-*.whl")))
        if hits:
            return hits[0]
    return None


def _pip(*args: str, log) -> None:
    cmd = [str(python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=tempfile.gettempdir(), env=clean_env())


def build(log=print) -> None:
    """Create ``.bench-venv`` and install the reference packages into it."""
    if not python().exists():
        log(f"creating {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    wheel = _local_torch_wheel()
    _pip(wheel or f"torch=={TORCH_VERSION}", log=log)
    _pip(*DEPS, log=log)
    _pip("--no-deps", *NO_DEPS, log=log)


_CHECK = """
import importlib, importlib.metadata as md, json, sys
out = {"python": sys.version.split()[0], "sys_path": sys.path}
for name, dist in %r.items():
    try:
        m = importlib.import_module(name)
        out[name] = {"version": md.version(dist), "file": m.__file__}
    except Exception as err:
        out[name] = {"error": f"{type(err).__name__}: {err}"}
for dist in ("numpy", "scipy", "einops", "unfoldNd", "opt-einsum", "setuptools"):
    try:
        out.setdefault("deps", {})[dist] = md.version(dist)
    except md.PackageNotFoundError:
        out.setdefault("deps", {})[dist] = None
print(json.dumps(out))
"""


def check() -> dict:
    """Import the reference packages in ``.bench-venv`` (from a temp dir) and report.

    Returns:
        ``{import name: {"version", "file"} or {"error"}}`` plus ``"ok"``.

    Raises:
        RuntimeError: When ``cockpit`` resolves to this repository (the clash this
            environment exists to avoid) or torch is not the pinned CPU build.
    """
    if not python().exists():
        return {"ok": False, "error": f"{python()} does not exist; build it first"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [str(python()), "-c", _CHECK % (IMPORTS,)],
            cwd=tmp,
            env=clean_env(),
            capture_output=True,
            text=True,
            check=True,
        )
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    cockpit_file = info.get("cockpit", {}).get("file") or ""
    if cockpit_file and Path(cockpit_file).resolve().is_relative_to(ROOT / "cockpit"):
        raise RuntimeError(f"reference 'cockpit' resolves to this repository: {cockpit_file}")
    version = info.get("torch", {}).get("version", "")
    if overridden():
        info["override"] = {"python": str(python()), "path": os.environ.get(PATH_ENV, "")}
    elif not version.startswith(TORCH_VERSION) or "cu" in version.split("+")[-1]:
        raise RuntimeError(f".bench-venv has torch {version!r}, expected {TORCH_VERSION}+cpu")
    info["ok"] = all("error" not in info[k] for k in IMPORTS)
    return info


def ensure(log=print) -> dict:
    """Build the environment unless every reference package already imports; then check."""
    info = check()
    if not info.get("ok") and not overridden():
        build(log=log)
        info = check()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference_env")
    parser.add_argument("--rebuild", action="store_true", help="delete .bench-venv first")
    args = parser.parse_args(argv)
    if args.rebuild and VENV.exists():
        shutil.rmtree(VENV)
    info = ensure()
    info.pop("sys_path", None)
    print(json.dumps(info, indent=2))
    return 0 if info.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
