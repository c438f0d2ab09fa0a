"""A real training process for test_log_crash.py (run as a script, killed with SIGKILL).

Trains a small MLP with SGD on random regression data and logs, every step, the
loss and the gradient norm of every parameter and of the whole model through a
LogWriter. After each step's rows are handed to the writer it appends a line
"STEP TIME" to the report file with one os.write (the kernel keeps it even when
the process is killed right after), where TIME is the ``time.time()`` taken
just before the rows were added, so the parent knows which steps it logged and
when. Every ``--pause-every`` steps it pauses (an evaluation, a slow step).
"""

import argparse
import math
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("report")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--flush-steps", type=int, default=5)
    parser.add_argument("--flush-seconds", type=float, default=30.0)
    parser.add_argument("--max-queue", type=int, default=1)
    parser.add_argument("--compact-every", type=int, default=8)
    parser.add_argument("--sleep", type=float, default=0.001, help="extra seconds per step")
    parser.add_argument("--pause-every", type=int, default=0, help="pause after every N steps")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds per pause")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from torch import nn

    from cockpit.logwriter import LogWriter
    from cockpit.schema import describe_model, describe_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(512, 1)
    metadata = {
        "model": describe_model(model),
        "optimizer": describe_optimizer(optimizer),
        "instruments": [{"name": "grad_norm", "schedule": "every(1)", "config": {}}],
        "tags": {"script": "crash-test"},
    }
    report = os.open(args.report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with LogWriter(
        args.run_dir,
        metadata,
        flush_every_steps=args.flush_steps,
        flush_every_seconds=args.flush_seconds,
        max_queue=args.max_queue,
        compact_every=args.compact_every,
    ) as log:
        for step in range(args.steps):
            index = torch.randint(0, len(x), (32,))
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[index]), y[index])
            loss.backward()
            norms = [(name, p.grad.norm().item()) for name, p in model.named_parameters()]
            rows = [("loss", "loss", "all", loss.item())]
            rows.append(("grad_norm", "grad_norm", "all", math.sqrt(sum(n * n for _, n in norms))))
            rows.extend(("grad_norm", "grad_norm", name, n) for name, n in norms)
            added = time.time()
            log.add_scalars(step, rows)
            os.write(report, f"{step} {added!r}\n".encode())
            optimizer.step()
            if args.sleep:
                time.sleep(args.sleep)
            if args.pause_every and (step + 1) % args.pause_every == 0:
                time.sleep(args.pause)
    os.close(report)


if __name__ == "__main__":
    main()
