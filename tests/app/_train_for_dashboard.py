"""Train a small classifier with a real Cockpit, logging to ROOT/RUN (helper of test_browser.py).

Run as a script: ``python tests/app/_train_for_dashboard.py ROOT RUN [--steps N] [--sleep S]``.
Instruments: the ``economy`` preset plus ``grad_hist_2d``; the user metric ``accuracy`` is
logged every step. The log is flushed every few steps (and at least every 0.3 s), so a
dashboard sees new steps quickly. ``--start-file`` makes the process wait until that file
exists before training, so a test can start torch early and release training later.
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--start-file", default=None)
    args = parser.parse_args()

    import torch
    from torch import nn

    from cockpit import Cockpit
    from instruments import PRESETS

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
    if args.start_file is not None:
        while not os.path.exists(args.start_file):
            time.sleep(0.02)
    instruments = [*PRESETS["economy"], "grad_hist_2d"]
    with Cockpit(
        model,
        loss_fn,
        opt,
        instruments=instruments,
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
