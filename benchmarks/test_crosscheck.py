"""Numerical cross-check: our instruments equal Cockpit 1.0.2's on the same model and batches.

Run explicitly (the main suite's ``testpaths`` is ``tests/``, so ``pytest`` alone never
collects this file)::

    .venv/bin/python -m benchmarks crosscheck
    .venv/bin/python -m pytest -q -s benchmarks/test_crosscheck.py   # the same

It needs ``.bench-venv`` with Cockpit 1.0.2 (``.venv/bin/python -m
benchmarks.reference_env``) and skips with that message when it is missing.

**Set-up** (:mod:`benchmarks.crosscheck`). Two float64 models, an MLP 12-16-10-5 with
sigmoid and tanh (the diagonal Hessian has residual terms) and a small CNN (conv, ReLU,
max-pool, padded conv, ReLU, dense); cross-entropy with mean reduction, N = 16, three
steps of vanilla SGD (lr 0.3, no momentum or weight decay: where all of Cockpit's
definitions apply), a different random batch each step. Each side trains from the same
saved state on the same saved batches, once per run: the ``economy``, ``business`` and
``full`` presets, and ``extra`` = the Cockpit instruments that no preset contains
(``mean_gsnr``, ``early_stopping``, ``cabs``, ``tic_trace``). Ours goes through the
public ``Cockpit`` API and is read back from its Parquet log; Cockpit 1.0.2 runs with its
documented usage (BackPACK-extended model and loss, ``info`` with the individual losses,
``backward(create_graph=cockpit.create_graph(step))``) in ``.bench-venv``, in another
process, and is read from ``Cockpit.get_output()``.

**What must agree.** Every value Cockpit reports, at every step it reports it, to a
relative tolerance of 1e-8 (:data:`RTOL`; float64, so agreement is ~1e-15 in practice):
``loss``, ``norm_test``, ``inner_test``, ``ortho_test``, ``alpha``, ``tic_diag``,
``tic_trace``, ``mean_gsnr``, ``early_stopping``, ``cabs``; the per-tensor lists of
``grad_norm``, ``distance``, ``update_size`` and ``hess_trace`` against our per-tensor
rows (and our model-wide row against their root-sum-of-squares or sum); the histogram
counts of ``grad_hist_1d`` and ``grad_hist_2d`` exactly (model-wide, and per tensor for
2D via Cockpit's ``keep_individual=True``), edges to 1e-12. ``hess_max_ev`` is checked
against the exact largest-magnitude eigenvalue of the explicit Hessian: ours within its
tolerance 1e-3, Cockpit's within :data:`COCKPIT_MAX_EV_RTOL` (see below).

**Differences by design** (not compared, or compared differently):

- ``batch_size`` (batch sizes at which the gradient tests would reach their
  thresholds) and ``hyperparameters`` (lr, momentum, weight decay, N per group) are in
  our presets but have no Cockpit quantity (its hyperparameter gauge plots what the
  user logs).
- Cockpit reports ``grad_norm``, ``distance``, ``update_size`` and ``hess_trace`` per
  tensor only; we also log the model-wide value (checked as their root-sum-of-squares or
  sum). Cockpit reports the gradient tests, ``tic_diag``, ``tic_trace``, ``mean_gsnr``,
  ``early_stopping``, ``cabs`` and the 1D histogram model-wide only; our per-tensor rows
  of those have no counterpart.
- ``update_size`` and ``alpha`` of step t: Cockpit computes them at step t+1 (it caches
  θ_t), we right after ``optimizer.step()`` (update size) or when step t+1 arrives
  (alpha). The last step's update size therefore exists only in our log; compared on
  the steps both have. Alpha needs two steps on both sides.
- Our alpha, update size and CABS use the actual update θ_{t+1} − θ_t of any optimizer
  (CABS: the effective learning rate of that update); Cockpit's alpha projects onto
  −lr·g (BackPACK path) only for vanilla SGD and otherwise caches two steps of
  individual gradients, and its CABS and early-stopping criterion refuse other
  optimizers. With vanilla SGD the definitions coincide, which is why the check uses
  it; other optimizers are covered by the main suite against MATH.md formulas.
- Both sides assume ``reduction="mean"`` here: Cockpit rescales BackPACK's 1/N-scaled
  individual gradients by N and does not support ``"sum"``; ours supports both.
- ``hess_trace`` and ``tic_diag``/``tic_trace`` use the exact diagonal Hessian on both
  sides (Cockpit's default ``"diag_h"``, our default ``"hessian"``; our ``exact`` metric
  must be 1: a Hutchinson fallback would not be comparable).
- ``hess_max_ev``: Cockpit's power iteration starts from a random vector and stops when
  two consecutive Rayleigh quotients agree to rtol 1e-3 (atol 1e-6), which bounds the
  change per iteration, not the error; here its estimates fall up to ~0.7 % below the
  exact value, hence :data:`COCKPIT_MAX_EV_RTOL` = 1e-2. Ours is Lanczos with a relative
  error bound of 1e-3, warm-started from the previous step's eigenvector.
- Histograms: Cockpit bins in the gradients' dtype arithmetic, we bin against float64
  edges as numpy does; a value within rounding distance of an interior edge could fall
  in the neighbouring bin on one side. With float64 random data this has probability
  ~1e-9 here, so counts are compared exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from benchmarks import crosscheck, reference_env

RTOL = 1e-8
#: Absolute slack for values that are exactly zero on both sides (distance at step 0).
ATOL = 1e-14
OUR_MAX_EV_RTOL = 1e-3
COCKPIT_MAX_EV_RTOL = 1e-2

#: Cockpit 1.0.2 quantity class → (our instrument, how its output compares).
MAP: dict[str, tuple[str, str]] = {
    "Loss": ("loss", "scalar"),
    "NormTest": ("norm_test", "scalar"),
    "InnerTest": ("inner_test", "scalar"),
    "OrthoTest": ("ortho_test", "scalar"),
    "Alpha": ("alpha", "scalar"),
    "TICDiag": ("tic_diag", "scalar"),
    "TICTrace": ("tic_trace", "scalar"),
    "MeanGSNR": ("mean_gsnr", "scalar"),
    "EarlyStopping": ("early_stopping", "scalar"),
    "CABS": ("cabs", "scalar"),
    "GradNorm": ("grad_norm", "norm"),
    "Distance": ("distance", "norm"),
    "UpdateSize": ("update_size", "norm"),
    "HessTrace": ("hess_trace", "sum"),
    "GradHist1d": ("grad_hist_1d", "hist"),
    "GradHist2d": ("grad_hist_2d", "hist"),
    "HessMaxEV": ("hess_max_ev", "eigen"),
}
#: Our instruments in the presets without a Cockpit quantity, and why.
NO_COUNTERPART = {
    "batch_size": "suggested batch sizes of the gradient tests; Cockpit has none",
    "hyperparameters": "logged from the optimizer; Cockpit's gauge plots user-logged values",
}

ITEMS = [
    (case, run, q)
    for case in crosscheck.CASES
    for run in crosscheck.RUNS
    for q in crosscheck._reference_quantities(run)
]


@dataclass
class Results:
    """Both sides' outputs for every (case, run), loaded from the exchange directory."""

    directory: Path
    ours: dict[tuple[str, str], dict] = field(default_factory=dict)
    ref: dict[tuple[str, str], dict] = field(default_factory=dict)
    exact: dict[str, dict] = field(default_factory=dict)
    #: instrument → largest relative difference seen (for the summary).
    worst: dict[str, float] = field(default_factory=dict)

    def load(self) -> Results:
        for case in crosscheck.CASES:
            for run in crosscheck.RUNS:
                base = self.directory / f"{case}.{run}"
                self.ours[case, run] = json.loads(Path(f"{base}.ours.json").read_text())
                self.ref[case, run] = json.loads(Path(f"{base}.reference.json").read_text())
            self.exact[case] = json.loads((self.directory / f"{case}.exact.json").read_text())
        return self

    def scalar(self, case: str, run: str, instrument: str, step: int, param: str = "all"):
        rows = [
            r[4]
            for r in self.ours[case, run]["scalars"]
            if r[0] == step and r[1] == instrument and r[2] == instrument and r[3] == param
        ]
        assert len(rows) <= 1, f"{instrument} logged {len(rows)} times at step {step}"
        return rows[0] if rows else None

    def hist(self, case: str, run: str, instrument: str, step: int, param: str = "all"):
        rows = [
            h
            for h in self.ours[case, run]["histograms"]
            if h[0] == step and h[1] == instrument and h[2] == param
        ]
        assert len(rows) <= 1, f"{instrument}/{param} logged {len(rows)} times at step {step}"
        return rows[0] if rows else None

    def record(self, instrument: str, ours: float, theirs: float) -> None:
        diff = _rel(ours, theirs)
        self.worst[instrument] = max(self.worst.get(instrument, 0.0), diff)


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(b), 1e-300)


def _close(a: float, b: float, rtol: float = RTOL) -> bool:
    return abs(a - b) <= rtol * abs(b) + ATOL


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Results:
    info = reference_env.check()
    if not info.get("ok"):
        reason = info.get("error") or f"{reference_env.VENV} does not import Cockpit 1.0.2"
        pytest.skip(
            f"cross-check needs the reference environment: {reason}. Build it with "
            "`.venv/bin/python -m benchmarks.reference_env`"
        )
    directory = tmp_path_factory.mktemp("crosscheck")
    crosscheck.run_both(directory)
    return Results(directory).load()


def _ref_steps(res: Results, case: str, run: str, quantity: str) -> dict[int, object]:
    out = res.ref[case, run]["output"]
    return {int(s): v[quantity] for s, v in out.items() if quantity in v}


def test_reference_versions(results: Results) -> None:
    """The reference side ran Cockpit 1.0.2 with BackPACK 1.7.1 on our torch."""
    versions = next(iter(results.ref.values()))["versions"]
    assert versions["cockpit"] == "1.0.2"
    assert versions["backpack"] == "1.7.1"


@pytest.mark.parametrize("case", list(crosscheck.CASES))
@pytest.mark.parametrize("run", list(crosscheck.RUNS))
def test_same_instruments(results: Results, case: str, run: str) -> None:
    """Our run reports exactly the Cockpit quantities' counterparts plus the listed extras."""
    expected = {MAP[q][0] for q in crosscheck._reference_quantities(run)}
    ours = set(results.ours[case, run]["instruments"])
    assert ours - expected <= set(NO_COUNTERPART), ours - expected
    assert expected <= ours, expected - ours
    seen = {q for v in results.ref[case, run]["output"].values() for q in v}
    assert seen == set(crosscheck._reference_quantities(run))


@pytest.mark.parametrize(("case", "run", "quantity"), ITEMS, ids=["-".join(i) for i in ITEMS])
def test_equal(results: Results, case: str, run: str, quantity: str) -> None:
    """One Cockpit quantity in one run: our value equals it at every step Cockpit reports."""
    name, kind = MAP[quantity]
    steps = _ref_steps(results, case, run, quantity)
    assert steps, f"Cockpit reported no {quantity}"
    params = results.ours[case, run]["params"]
    for step, theirs in steps.items():
        where = f"{case}/{run} step {step}"
        if kind == "scalar":
            ours = results.scalar(case, run, name, step)
            assert ours is not None, f"{where}: no {name}"
            results.record(name, ours, theirs)
            assert _close(ours, theirs), f"{where}: {name} {ours!r} vs Cockpit {theirs!r}"
        elif kind in ("norm", "sum"):
            assert len(theirs) == len(params)
            for param, value in zip(params, theirs, strict=True):
                ours = results.scalar(case, run, name, step, param)
                assert ours is not None, f"{where}: no {name} for {param}"
                results.record(name, ours, value)
                assert _close(ours, value), f"{where}: {name}[{param}] {ours!r} vs {value!r}"
            total = math.sqrt(sum(v * v for v in theirs)) if kind == "norm" else math.fsum(theirs)
            ours = results.scalar(case, run, name, step)
            results.record(name, ours, total)
            assert _close(ours, total), f"{where}: model-wide {name} {ours!r} vs {total!r}"
        elif kind == "hist":
            _check_hist(results, case, run, name, step, "all", theirs["hist"], theirs["edges"])
            if name == "grad_hist_2d":
                assert theirs["param_groups"] == len(params)
                for i, param in enumerate(params):
                    per = theirs[f"param_{i}"]
                    _check_hist(results, case, run, name, step, param, per["hist"], per["edges"])
        elif kind == "eigen":
            exact = results.exact[case]["hess_max_ev"][str(step)]
            ours = results.scalar(case, run, name, step)
            results.record(name + " (ours vs exact)", ours, exact)
            results.record(name + " (Cockpit vs exact)", theirs, exact)
            assert _close(theirs, exact, COCKPIT_MAX_EV_RTOL), (
                f"{where}: Cockpit's power iteration {theirs!r} vs exact {exact!r}"
            )
            assert _close(ours, exact, OUR_MAX_EV_RTOL), (
                f"{where}: our hess_max_ev {ours!r} vs exact {exact!r} "
                f"(relative error {_rel(ours, exact):.1e} > tolerance {OUR_MAX_EV_RTOL:g})"
            )
        else:  # pragma: no cover
            raise AssertionError(kind)
    if name == "hess_trace" or name.startswith("tic_"):
        exact_flags = [
            r[4]
            for r in results.ours[case, run]["scalars"]
            if r[1] == "hess_trace" and r[2] == "exact"
        ]
        assert all(f == 1.0 for f in exact_flags), "our diagonal Hessian was not exact"


def _check_hist(res: Results, case, run, name, step, param, counts, edges) -> None:
    row = res.hist(case, run, name, step, param)
    assert row is not None, f"{case}/{run} step {step}: no {name} for {param}"
    _, _, _, ours_counts, edges_0, edges_1 = row
    assert _flat(ours_counts) == [float(c) for c in _flat(counts)], (
        f"{case}/{run} step {step}: {name}[{param}] counts differ"
    )
    their_edges = edges if name == "grad_hist_1d" else edges[0]
    assert all(_close(a, b, 1e-12) for a, b in zip(edges_0, their_edges, strict=True))
    if name == "grad_hist_2d":
        assert all(_close(a, b, 1e-12) for a, b in zip(edges_1, edges[1], strict=True))
    res.worst[name] = max(res.worst.get(name, 0.0), 0.0)


def _flat(x) -> list:
    if isinstance(x, list):
        return [v for item in x for v in _flat(item)]
    return [x]


def test_summary(results: Results) -> None:
    """Print the largest relative difference per instrument (``-s`` shows it)."""
    lines = ["", "largest relative difference, ours vs Cockpit 1.0.2 (float64):"]
    for name, diff in sorted(results.worst.items()):
        lines.append(f"  {name:<36} {diff:.1e}")
    print("\n".join(lines))
