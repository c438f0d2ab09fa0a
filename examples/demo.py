"""The main job: train a CNN on scikit-learn's digits with a cockpit, serve the live dashboard.

``make demo`` runs this. Training runs in a background thread and logs to
``runs/demo-<time>`` (the ``business`` preset: economy plus Hessian trace and TIC);
the dashboard serves ``runs/`` on http://127.0.0.1:8050 and updates while training
runs. Stop with Ctrl-C; the log is flushed on exit.

    python -m examples.demo --steps 2000 --logdir runs --port 8050
    python -m examples.demo --no-serve --steps 50     # train only, print where the log is
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from cockpit import Cockpit, schedules

log = logging.getLogger("cockpit.demo")


def make_data(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images ``[1797, 1, 8, 8]`` (standardized) and labels ``[1797]``."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    return x.to(device), torch.tensor(digits.target, dtype=torch.long, device=device)


def make_model() -> nn.Module:
    """A small CNN for 8x8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(
    run_dir: Path, steps: int, batch_size: int = 64, preset: str = "business", stop=None
) -> dict[str, float]:
    """Train with a cockpit attached; returns the last instrument values."""
    torch.manual_seed(0)
    x, y = make_data()
    n_train = 1500
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with Cockpit(
        model,
        loss_fn,
        opt,
        instruments=preset,
        logdir=run_dir,
        schedule=schedules.every(1),
        tags={"example": "demo", "data": "sklearn digits"},
        log_options={"flush_every_steps": 5, "flush_every_seconds": 1.0},
    ) as cockpit:
        for step in range(steps):
            if stop is not None and stop.is_set():
                break
            idx = torch.randint(0, n_train, (batch_size,))
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            with cockpit.step(step, loss):
                loss.backward()
            opt.step()
            if step % 25 == 0:
                model.eval()
                with torch.no_grad():
                    acc = (model(x[n_train:]).argmax(1) == y[n_train:]).float().mean()
                model.train()
                cockpit.log(step, test_accuracy=acc)
                log.info("step %d  loss %.4f  test accuracy %.3f", step, loss.item(), acc.item())
        return cockpit.latest()


def main(argv: list[str] | None = None) -> None:
    """Train in the background and serve the dashboard in the foreground."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--logdir", type=Path, default=Path("runs"), help="log root")
    parser.add_argument("--preset", default="business", choices=["economy", "business", "full"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8050)
    parser.add_argument("--no-serve", action="store_true", help="train only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = args.logdir / time.strftime("demo-%Y%m%d-%H%M%S")
    log.info("logging to %s", run_dir)
    if args.no_serve:
        train(run_dir, args.steps, preset=args.preset)
        log.info("done; inspect with: cockpit summary %s", run_dir)
        return
    from app import serve

    stop = threading.Event()
    worker = threading.Thread(
        target=train,
        args=(run_dir, args.steps),
        kwargs={"preset": args.preset, "stop": stop},
        daemon=True,
    )
    worker.start()
    log.info("dashboard: http://%s:%d  (Ctrl-C to stop)", args.host, args.port)
    try:
        serve(args.logdir, host=args.host, port=args.port, refresh_s=2.0)
    finally:
        stop.set()
        worker.join(timeout=30)


if __name__ == "__main__":
    main()
