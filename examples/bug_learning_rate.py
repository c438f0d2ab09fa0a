"""Bug hunt: learning rate too large. α sits near +1 while the loss still falls.

Two twins train the same linear least-squares classifier on digits (a linear layer
64 → 10 fitted to one-hot targets with ``MSELoss``) with plain SGD, batch 64:

* ``ROOT/healthy``: lr 0.1;
* ``ROOT/broken``: lr 0.3, three times larger.

What to look at: **α** (``alpha``, the normalized step length). Cockpit fits a parabola to
the loss along each step, from the loss and the slope at both ends, and reports where the
step landed: −1 = barely moved down the parabola, 0 = at its minimum, +1 = at the same
height on the other side, > 1 = higher up the other side (overshoot, divergence). The
squared loss of a linear model is exactly a parabola along every step, so α here is as
clean as it gets. Measured over seeds 0-3: median α of the broken twin 0.91-0.96 (every
step jumps across the valley to nearly the same height), of the healthy twin −0.15 to
−0.10 over 60 steps and 0.06-0.09 over 200. Yet the broken twin's loss *falls*, from
about 0.45 at step 0 to 0.11-0.23 over steps 10-19, as fast as or a bit slower than the
healthy twin's (0.11-0.12); later it stays noisier and ends at or above the healthy
twin's (last 10 of 200 steps: 0.042-0.070 vs 0.039-0.042; test accuracy 0.83-0.91 vs
0.91). The loss curve alone does not say the learning rate is at its limit; α does, from
the first steps on. A little more (lr 0.32) and the loss diverges within a few steps,
with α > 1.

(Deep networks read the same way, but their α is noisier: with cross-entropy and
mini-batches we measured median α of only 0.3-0.6 even for learning rates that
diverge, as the nonlinear loss is no parabola far from the current point.)

Run it and compare the twins in the dashboard::

    python -m examples.bug_learning_rate --logdir runs/learning_rate
    cockpit dashboard runs/learning_rate

In the dashboard, select both runs under "Runs": their loss curves both fall. The α
panel (the unit parabola with the density of α over all steps and over the recent ones)
shows the run chosen under "Gauges & histograms of": for the broken run the mass sits
at +1, on the far wall of the parabola, for the healthy run around 0, at the bottom. The
dashboard's hint "learning rate probably too large" fires for the broken run (median α
above 0.5). The script logs the median α, the loss at step 0, over steps 10-19 and over
the last 10, and the dashboard hints of each twin, and returns them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cockpit.logreader import read_log

try:
    from examples import _common
except ImportError:  # run as a file: python examples/bug_learning_rate.py
    import _common  # type: ignore[no-redef]

log = logging.getLogger("examples.bug_learning_rate")

LEARNING_RATES = {"healthy": 0.1, "broken": 0.3}


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    """One-hot float targets for the squared loss."""
    return F.one_hot(labels, 10).to(torch.float32)


def train_twin(run, lr: float, steps: int, seed: int) -> _common.RunResult:
    """Train the linear least-squares classifier with plain SGD at learning rate ``lr``."""
    torch.manual_seed(seed)
    data = _common.digits(flat=True)
    model = nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return _common.train(
        run,
        model,
        nn.MSELoss(),
        opt,
        data,
        steps=steps,
        seed=seed,
        target=one_hot,
        tags={"example": "learning_rate", "lr": lr},
    )


def series(run, instrument: str) -> np.ndarray:
    """The model-wide values of one instrument, in step order."""
    df = read_log(run, instruments=instrument)
    df = df[(df.param == "all") & (df.metric == instrument)]
    return df.value.to_numpy(dtype=float)


def main(argv: list[str] | None = None) -> dict:
    """Train both twins and compare their α and loss."""
    args = _common.parser(__doc__, steps=200, logdir="runs/learning_rate").parse_args(argv)
    if args.steps < 20:
        raise SystemExit("--steps must be at least 20 (the loss is compared over steps 10-19)")
    _common.setup_logging()
    runs = {name: _common.fresh_run(args.logdir, name, args.overwrite) for name in LEARNING_RATES}
    results = {
        name: train_twin(run, LEARNING_RATES[name], steps=args.steps, seed=args.seed)
        for name, run in runs.items()
    }
    alpha, loss = {}, {}
    for name, run in runs.items():
        alpha[name] = _common.finite_median(series(run, "alpha"))
        values = series(run, "loss")
        loss[name] = {
            "start": float(values[0]),
            "steps_10_19": float(np.mean(values[10:20])),
            "last_10": float(np.mean(values[-10:])),
        }
    hints = {name: _common.dashboard_hints(run) for name, run in runs.items()}
    for name, res in results.items():
        log.info(
            "%-7s lr %.2f: median alpha %+.2f; loss %.3f at step 0, %.3f over steps 10-19, "
            "%.3f over the last 10; test accuracy %.2f",
            name,
            LEARNING_RATES[name],
            alpha[name],
            loss[name]["start"],
            loss[name]["steps_10_19"],
            loss[name]["last_10"],
            res.test_accuracy,
        )
        for hint in hints[name]:
            log.info("%-7s dashboard hint [%s] %s", name, hint.rule, hint.text)
    log.info(
        "alpha shows the difference: median %+.2f (lr %.2g) vs %+.2f (lr %.2g); both losses "
        "fall, but the large learning rate's steps overshoot to the far side of the valley",
        alpha["broken"],
        LEARNING_RATES["broken"],
        alpha["healthy"],
        LEARNING_RATES["healthy"],
    )
    log.info("view both runs with: cockpit dashboard %s", args.logdir)
    return {
        "root": args.logdir,
        "runs": runs,
        "alpha": alpha,
        "loss": loss,
        "test_accuracy": {name: res.test_accuracy for name, res in results.items()},
        "hints": {name: [h.rule for h in hs] for name, hs in hints.items()},
    }


if __name__ == "__main__":
    main()
