"""Train a small classifier with a real Cockpit, logging to ROOT/RUN (helper of test_browser.py).

Run as a script: ``python tests/app/_train_for_dashboard.py ROOT RUN [--steps N] [--sleep S]``.
Instruments: the ``economy`` preset plus ``grad_hist_2d``, every step except the two
histograms (every ``--hist-every`` steps, as one thins the costliest first-order quantities);
the user metric ``accuracy`` is logged every step. The log is flushed every few steps (and at
least every 0.3 s), so a dashboard sees new steps quickly.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--sleep", type=float, default=0.02, help="seconds between steps")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flush-steps", type=int, default=2)
    parser.add_argument("--flush-seconds", type=float, default=0.3)
    parser.add_argument("--hist-every", type=int, default=5)
    args = parser.parse_args()

    import torch
    from torch import nn

    from cockpit import Cockpit, schedules  # before instruments: import-order dependency
    from instruments import PRESETS, get

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x = torch.randn(1024, 10)
    y = (x @ torch.randn(10, 4) + 0.5 * torch.randn(1024, 4)).argmax(1)
    model = nn.Sequential(
        nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    loss_fn = nn.CrossEntropyLoss()
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    hist = ("grad_hist_1d", "grad_hist_2d")
    chosen = [
        get(name, schedules.every(args.hist_every)) if name in hist else name
        for name in (*PRESETS["economy"], "grad_hist_2d")
    ]
    with Cockpit(
        model,
        loss_fn,
        opt,
        instruments=chosen,
        logdir=Path(args.root) / args.run,
        tags={"optimizer": args.optimizer, "lr": args.lr},
        log_options={
            "flush_every_steps": args.flush_steps,
            "flush_every_seconds": args.flush_seconds,
        },
    ) as cockpit:
        for step in range(args.steps):
            index = torch.randint(0, len(x), (64,))
            opt.zero_grad()
            out = model(x[index])
            loss = loss_fn(out, y[index])
            with cockpit.step(step, loss):
                loss.backward()
            opt.step()
            cockpit.log(step, accuracy=float((out.argmax(1) == y[index]).float().mean()))
            if args.sleep:
                time.sleep(args.sleep)


if __name__ == "__main__":
    main()
