"""SIGKILL a real training process while it logs, and check what survives on disk.

The bar: every kill leaves a log that reads back as a prefix of the steps, with
no gaps or duplicates, and loses at most the rows of one flush interval, i.e.
rows lost <= rows produced in F = FLUSH_STEPS steps or T = FLUSH_SECONDS
seconds, whichever is less. Precisely, with R the last step the child reported
(it reports a step right after adding its rows, one add per step) and K the
number of steps on disk when it was killed at time tau:

* steps 0..K-1 are on disk, each complete, nothing else (K <= R + 1);
* R + 1 - K <= F: the reported steps missing from disk are among the newest F;
* every missing reported step was added after tau - T: no row older than T
  seconds was lost.

The child takes about a millisecond per step, where the step bound binds, and
pauses for PAUSE > T seconds after every PAUSE_EVERY steps (an evaluation, a
slow step), where only the time bound can: half of the kills land in such a
pause. The writer's background compaction runs every 8 segments, so some kills
land in the middle of one. ``LogWriter`` keeps this bound by handing rows off
every half interval and, when the disk falls further behind, making the next
step wait (see :mod:`cockpit.logwriter`).
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
FLUSH_SECONDS = 0.8
PAUSE_EVERY = 40
PAUSE = 1.5
MAX_QUEUE = 1
ROWS_PER_STEP = 6  # loss, grad norm "all", four parameters
KEY = ["step", "instrument", "metric", "param"]
# time.time() in the child just before add_scalars vs. when the writer stamps the
# rows a moment later, and in the parent just before SIGKILL vs. the kill itself.
CLOCK_SLACK = 0.02


def _reported(report: Path) -> list[tuple[int, float]]:
    """The ``(step, time added)`` lines the child wrote (a partial last line is ignored)."""
    if not report.exists():
        return []
    lines = report.read_bytes().split(b"\n")[:-1]  # the last piece is "" or partial
    return [(int(step), float(added)) for step, added in (line.split() for line in lines)]


def _start_child(run_dir: Path, report: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        str(SCRIPT),
        str(run_dir),
        str(report),
        f"--flush-steps={FLUSH_STEPS}",
        f"--flush-seconds={FLUSH_SECONDS}",
        f"--max-queue={MAX_QUEUE}",
        "--sleep=0.001",
        f"--pause-every={PAUSE_EVERY}",
        f"--pause={PAUSE}",
    ]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _kill_at(proc: subprocess.Popen, report: Path, target_step: int, delay: float) -> float:
    """SIGKILL the child ``delay`` s after it reports ``target_step``; return the kill time."""
    deadline = time.monotonic() + 60
    while True:
        lines = _reported(report)
        if lines and lines[-1][0] >= target_step:
            break
        if proc.poll() is not None:
            pytest.fail(f"training child exited early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training child made no progress")
        time.sleep(0.0005)
    time.sleep(delay)
    killed = time.time()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return killed


def _check_prefix(run_dir: Path, reported: list[tuple[int, float]], killed: float) -> int:
    """Check the log of a killed run against the bound; return how many reported steps it lost."""
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
    last = reported[-1][0]
    assert k <= last + 1, f"{k} steps on disk but the child reported only up to {last}"
    lost = reported[k:]
    assert len(lost) <= FLUSH_STEPS, (
        f"lost {len(lost)} steps > {FLUSH_STEPS} (reported 0..{last}, on disk 0..{k - 1})"
    )
    if lost:
        age = killed - lost[0][1]
        assert age <= FLUSH_SECONDS + CLOCK_SLACK, (
            f"lost step {lost[0][0]}, added {age:.3f} s before the kill > {FLUSH_SECONDS} s"
        )
    assert run_status(run_dir) == "crashed"
    return len(lost)


def _run_and_kill(
    run_dir: Path, report: Path, target: int, delay: float
) -> tuple[list[tuple[int, float]], float]:
    proc = _start_child(run_dir, report)
    killed = _kill_at(proc, report, target, delay)
    reported = _reported(report)
    assert [step for step, _ in reported] == list(range(len(reported)))
    return reported, killed


def _plan(tmp_path: Path) -> list[tuple[Path, Path, int, float]]:
    rng = random.Random(SEED)
    plan = []
    for i in range(KILLS):
        if i % 2:  # during a pause: only the time bound can hold there
            target = rng.randrange(PAUSE_EVERY - 1, 3 * PAUSE_EVERY, PAUSE_EVERY)
            delay = rng.uniform(0.0, PAUSE - 0.1)
        else:  # while steps come every millisecond or two
            target = rng.randint(4 * FLUSH_STEPS, 3 * PAUSE_EVERY)
            delay = rng.uniform(0.0, 0.004)
        plan.append((tmp_path / f"run{i:02d}", tmp_path / f"report{i:02d}.txt", target, delay))
    return plan


@pytest.mark.slow
def test_sigkill_leaves_a_readable_prefix_of_steps(tmp_path):
    plan = _plan(tmp_path)
    # Children run four at a time (importing torch dominates their run time);
    # the logs are checked afterwards, in this thread.
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda args: _run_and_kill(*args), plan))
    losses = [
        _check_prefix(run_dir, reported, killed)
        for (run_dir, *_), (reported, killed) in zip(plan, outcomes, strict=True)
    ]
    run_dir = plan[-1][0]

    print(f"steps lost per kill (bound {FLUSH_STEPS} steps / {FLUSH_SECONDS} s): {losses}")

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
