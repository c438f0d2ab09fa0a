"""SIGKILL a real training process while it logs, and check what survives on disk.

What "loses at most one flush interval" means here. The child hands a batch to
the writer thread when the row of a new step arrives and the buffer already
holds F = flush_every_steps steps; the time trigger is set out of reach, so the
batches are exactly the steps [0, F), [F, 2F), ... The child reports a step
right after adding its rows. At the moment of the kill, with R the last
reported step and K the number of steps on disk:

* segments hold whole batches and are written in order, so K is a multiple of
  F and steps 0..K-1 are complete, without gaps or duplicates;
* the caller's buffer (not yet handed off: one flush interval, at most F
  steps) is lost, and K <= R + 1;
* so are the batches already handed off that the thread had not finished
  writing: none when the disk keeps up (then R + 1 - K <= F); when it lags,
  up to max_queue being written (the thread takes everything queued at once)
  and max_queue waiting in the queue, which then blocks training. So
  R + 1 - K <= (2 max_queue + 1) F whatever the timing (3F = 15 steps here),
  which is what each kill asserts.

The child also compacts every 8 segments in the background, so some kills land
in the middle of a compaction.
"""

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from cockpit.logreader import LogTail, read_log, run_status
from cockpit.logwriter import LogWriter

SCRIPT = Path(__file__).with_name("_log_training_script.py")
REPO = Path(__file__).resolve().parents[2]
KILLS = 20
SEED = 20240617
FLUSH_STEPS = 5
MAX_QUEUE = 1
ROWS_PER_STEP = 6  # loss, grad norm "all", four parameters
KEY = ["step", "instrument", "metric", "param"]


def _reported_steps(report: Path) -> list[int]:
    if not report.exists():
        return []
    lines = report.read_bytes().split(b"\n")
    return [int(line) for line in lines[:-1]]  # the last piece is "" or partial


def _start_child(run_dir: Path, report: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        str(SCRIPT),
        str(run_dir),
        str(report),
        f"--flush-steps={FLUSH_STEPS}",
        "--flush-seconds=3600",
        f"--max-queue={MAX_QUEUE}",
        "--sleep=0.001",
    ]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _kill_at(proc: subprocess.Popen, report: Path, target_step: int, delay: float) -> None:
    deadline = time.monotonic() + 60
    while True:
        steps = _reported_steps(report)
        if steps and steps[-1] >= target_step:
            break
        if proc.poll() is not None:
            pytest.fail(f"training child exited early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training child made no progress")
        time.sleep(0.0005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _check_prefix(run_dir: Path, reported: int) -> int:
    """Check the log of a killed run; return how many reported steps it lost."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # temp files are ignored silently; nothing is corrupt
        log = read_log(run_dir)
        tail = LogTail(run_dir).read_new()
    steps = sorted(set(log["step"]))
    k = len(steps)
    assert steps == list(range(k)), f"steps on disk are not a prefix 0..{k - 1}: {steps}"
    assert not log.duplicated(KEY).any(), "duplicate rows on disk"
    assert (log.groupby("step").size() == ROWS_PER_STEP).all(), "a step was written partially"
    pd.testing.assert_frame_equal(
        tail.reset_index(drop=True), log.reset_index(drop=True), check_like=False
    )
    assert k <= reported + 1, f"{k} steps on disk but the child reported only up to {reported}"
    assert k % FLUSH_STEPS == 0, f"{k} steps on disk: not a whole number of batches"
    lost = reported + 1 - k
    assert lost <= (2 * MAX_QUEUE + 1) * FLUSH_STEPS, (
        f"lost {lost} steps (reported {reported}, on disk 0..{k - 1})"
    )
    assert run_status(run_dir) == "crashed"
    return lost


def _run_and_kill(run_dir: Path, report: Path, target: int, delay: float) -> int:
    proc = _start_child(run_dir, report)
    _kill_at(proc, report, target, delay)
    reported = _reported_steps(report)
    assert reported == list(range(len(reported)))
    return reported[-1]


@pytest.mark.slow
def test_sigkill_leaves_a_readable_prefix_of_steps(tmp_path):
    rng = random.Random(SEED)
    plan = [
        (
            tmp_path / f"run{i:02d}",
            tmp_path / f"report{i:02d}.txt",
            rng.randint(4 * FLUSH_STEPS, 150),
        )
        + (rng.uniform(0.0, 0.004),)
        for i in range(KILLS)
    ]
    # Children run four at a time (importing torch dominates their run time);
    # the logs are checked afterwards, in this thread.
    with ThreadPoolExecutor(max_workers=4) as pool:
        reported = list(pool.map(lambda args: _run_and_kill(*args), plan))
    losses = [
        _check_prefix(run_dir, last) for (run_dir, *_), last in zip(plan, reported, strict=True)
    ]
    run_dir = plan[-1][0]

    print(f"steps lost per kill (flush interval {FLUSH_STEPS} steps): {losses}")

    # A new writer takes the dead child's lock over and continues the run.
    k = len(set(read_log(run_dir)["step"]))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        writer = LogWriter(run_dir)
    with writer:
        for step in range(k, k + 3):
            writer.add_scalars(step, [("loss", "loss", "all", 0.0)] * 1)
    log = read_log(run_dir)
    assert sorted(set(log["step"])) == list(range(k + 3))
    assert run_status(run_dir) == "finished"
