"""Bug hunt: unnormalized inputs. The 1D gradient histogram piles into its edge bins.

Two twins train the same MLP (64-64-10, ReLU) with Adam (lr 1e-2) on digits:

* ``ROOT/healthy``: pixels standardized (zero mean, unit variance);
* ``ROOT/broken``: raw 8-bit pixel values 0..255 (digits stores 0..16; we rescale them to
  the range of 8-bit image files, the usual form of this bug: a forgotten ``/ 255``).

What to look at: the **gradient histogram** (``grad_hist_1d``, Cockpit's default 100 bins
on (−2, 2); entries outside are clamped into the two edge bins). The individual gradient
of a first-layer weight is (back-propagated error) × (input), so inputs of size 255 make
those entries hundreds of times larger: the broken twin's histogram has a spike in each
edge bin, the healthy twin's has none. Measured over seeds 0-3, edge-bin mass averaged
over the tracked steps: 1.6-2.0 % (broken) vs 0.02-0.03 % (healthy), 62-84× (60 steps,
the tests' setting); 1.1-1.4 % vs 0.02 %, 52-71× over the default 100 steps. It is
largest at the start (15-18 % at step 0, above 5 % for the first 5-8 steps) and decays
as the network adapts its first layer to the input scale (0.1-0.4 % over the last steps
of 100). Meanwhile the loss hides the problem: the broken twin's loss
starts at 34-58 instead of 2.3, but it falls fast (Adam normalizes each parameter's
step), and its test accuracy ends only a few points lower (0.89-0.94 vs 0.95-0.97 after
100 steps). (With the 0..16 range the same signature appears, smaller: 0.2-0.6 %
edge mass.)

Run it and compare the twins in the dashboard::

    python -m examples.bug_unnormalized_inputs --logdir runs/unnormalized
    cockpit dashboard runs/unnormalized

In the dashboard, select both runs under "Runs"; the histogram panels show one run at a
time, chosen under "Gauges & histograms of". Switch between them: the broken run's
gradient histogram has a spike in each edge bin, the healthy one is a narrow peak around
zero. In the per-layer section, pick ``1.weight`` (the first layer, which sees the raw
inputs): that is where the spikes come from. The dashboard's hint "edge bins" looks at
the latest histogram and fires while its edge mass is above 5 %, i.e. during the first
steps of the broken run (watch it live). Late in the broken run the dashboard also flags
the first layer as "vanishing": the same layer's gradients are tiny for most samples and
huge for a few, both signs of a badly scaled input. The script logs the edge-bin masses,
the ratio and the dashboard hints of each twin, and returns them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from cockpit.logreader import read_histograms

try:
    from examples import _common
except ImportError:  # run as a file: python examples/bug_unnormalized_inputs.py
    import _common  # type: ignore[no-redef]

log = logging.getLogger("examples.bug_unnormalized_inputs")

#: digits stores pixels as 0..16; the broken twin sees them as 8-bit values 0..255.
PIXEL_SCALE = 255.0 / 16.0


def make_model() -> nn.Module:
    """The MLP both twins train."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def edge_mass(run, param: str = "all") -> float:
    """Mean fraction of the 1D gradient histogram's mass in its two edge bins, over all steps.

    Uses :func:`app.transforms.edge_mass`, the dashboard's own measure.
    """
    from app.transforms import edge_mass as _edge_mass

    hists = read_histograms(run, instrument="grad_hist_1d", param=param)
    if hists.empty:
        raise ValueError(f"{run} has no grad_hist_1d histograms for {param!r}")
    return float(np.mean([_edge_mass(c) for c in hists.counts]))


def train_twin(run, normalize: bool, steps: int, seed: int) -> _common.RunResult:
    """Train one twin: standardized inputs (healthy) or raw 8-bit pixel values (broken)."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = _common.digits(flat=True, normalize=normalize)
    if not normalize:
        x_train, x_test = x_train * PIXEL_SCALE, x_test * PIXEL_SCALE
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _common.train(
        run,
        model,
        nn.CrossEntropyLoss(),
        opt,
        (x_train, y_train, x_test, y_test),
        steps=steps,
        seed=seed,
        instruments="economy",
        tags={"example": "unnormalized", "inputs": "standardized" if normalize else "0..255"},
    )


def main(argv: list[str] | None = None) -> dict:
    """Train both twins and compare their gradient histograms' edge-bin mass."""
    args = _common.parser(__doc__, steps=100, logdir="runs/unnormalized").parse_args(argv)
    _common.setup_logging()
    runs = {
        "healthy": _common.fresh_run(args.logdir, "healthy", args.overwrite),
        "broken": _common.fresh_run(args.logdir, "broken", args.overwrite),
    }
    results = {
        name: train_twin(run, normalize=(name == "healthy"), steps=args.steps, seed=args.seed)
        for name, run in runs.items()
    }
    mass = {name: edge_mass(run) for name, run in runs.items()}
    first_layer = {name: edge_mass(run, "1.weight") for name, run in runs.items()}
    hints = {name: _common.dashboard_hints(run) for name, run in runs.items()}
    for name, res in results.items():
        log.info(
            "%-7s test accuracy %.2f, final loss %.3f, edge-bin mass of the gradient histogram "
            "%.4f (first layer %.4f)",
            name,
            res.test_accuracy,
            res.latest["loss"],
            mass[name],
            first_layer[name],
        )
        for hint in hints[name]:
            log.info("%-7s dashboard hint [%s] %s", name, hint.rule, hint.text)
    ratio = mass["broken"] / mass["healthy"] if mass["healthy"] > 0 else float("inf")
    log.info(
        "grad_hist_1d shows the difference: the unnormalized twin has %.1f%% of its individual "
        "gradients in the edge bins (clamped beyond ±2), %s the healthy twin's %.3f%%",
        100 * mass["broken"],
        f"{ratio:.0f}x" if np.isfinite(ratio) else "against",
        100 * mass["healthy"],
    )
    log.info("view both runs with: cockpit dashboard %s", args.logdir)
    return {
        "root": args.logdir,
        "runs": runs,
        "edge_mass": mass,
        "first_layer_edge_mass": first_layer,
        "ratio": ratio,
        "test_accuracy": {name: res.test_accuracy for name, res in results.items()},
        "hints": {name: [h.rule for h in hs] for name, hs in hints.items()},
    }


if __name__ == "__main__":
    main()
