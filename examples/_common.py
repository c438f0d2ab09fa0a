"""Shared pieces of the examples: data that ships with the packages, batching, arguments.

Nothing here downloads anything:

* :func:`digits` — scikit-learn's 8x8 handwritten digits (1797 images, bundled with
  scikit-learn), as ``[N, 1, 8, 8]`` images or flat ``[N, 64]`` vectors, standardized or
  with their raw pixel values 0..16.
* :func:`char_corpus` — English prose for a character language model: the module docstrings
  of a few standard-library modules (Python 3.11: 11 468 characters, 89 distinct).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cockpit import Cockpit

__all__ = [
    "CharCorpus",
    "RunResult",
    "batches",
    "char_corpus",
    "char_windows",
    "dashboard_hints",
    "digits",
    "evaluate",
    "finite_median",
    "fresh_run",
    "parser",
    "setup_logging",
    "train",
]

#: Standard-library modules whose docstrings make up the character corpus.
CORPUS_MODULES = ("argparse", "json", "inspect", "unittest", "typing", "difflib", "collections")


def digits(flat: bool = False, normalize: bool = True, test_fraction: float = 0.2, seed: int = 0):
    """Load scikit-learn's digits and split them into a training and a test part.

    Args:
        flat: ``[N, 64]`` vectors instead of ``[N, 1, 8, 8]`` images.
        normalize: Standardize with the training set's pixel mean and standard deviation
            (one scalar each); ``False`` keeps the raw pixel values 0..16.
        test_fraction: Share of the images held out for :func:`evaluate`.
        seed: Seed of the split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 inputs and int64 labels.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    x_train, x_test = x[train], x[test]
    if normalize:
        mean, std = x_train.mean(), x_train.std()
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if flat:
        x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    return x_train, y[train], x_test, y[test]


def batches(*tensors: Tensor, batch_size: int, seed: int = 0) -> Iterator[tuple[Tensor, ...]]:
    """Endless random mini-batches (without replacement within an epoch) of aligned tensors."""
    n = len(tensors[0])
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield tuple(t[idx] for t in tensors)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: Tensor, y: Tensor) -> float:
    """Classification accuracy of ``model`` on ``(x, y)`` (in eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return float((model(x).argmax(-1) == y).float().mean())
    finally:
        model.train(was_training)


@dataclass
class RunResult:
    """What :func:`train` returns.

    Attributes:
        run: The run directory.
        latest: ``cockpit.latest()`` after the last step.
        test_accuracy: Accuracy on the held-out digits after training.
    """

    run: Path
    latest: dict[str, float]
    test_accuracy: float


def train(
    run: Path,
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    instruments: str | Sequence = "economy",
    target: Callable[[Tensor], Tensor] | None = None,
    eval_every: int = 10,
    tags: dict | None = None,
) -> RunResult:
    """Train a digits classifier with a Cockpit attached; log the test accuracy as we go.

    Args:
        run: Run directory for the log.
        model: The classifier (logits ``[N, 10]``).
        loss_fn: The loss module.
        optimizer: The optimizer of ``model``.
        data: ``(x_train, y_train, x_test, y_test)`` as returned by :func:`digits`.
        steps: Training steps (all tracked).
        batch_size: Mini-batch size.
        seed: Seed of the batch order.
        instruments: Cockpit instruments (preset name, names or objects).
        target: Maps labels to the loss target (e.g. one-hot vectors for ``MSELoss``);
            default: the labels.
        eval_every: Log ``accuracy`` (held-out digits) every this many steps.
        tags: Tags stored in the run's metadata.
    """
    x_train, y_train, x_test, y_test = data
    to_target = target or (lambda labels: labels)
    stream = batches(x_train, y_train, batch_size=batch_size, seed=seed)
    with Cockpit(model, loss_fn, optimizer, instruments, logdir=run, tags=tags) as cockpit:
        for step in range(steps):
            x, y = next(stream)
            optimizer.zero_grad()
            loss = loss_fn(model(x), to_target(y))
            with cockpit.step(step, loss):
                loss.backward()
            optimizer.step()
            if step % eval_every == 0 or step == steps - 1:
                cockpit.log(step, accuracy=evaluate(model, x_test, y_test))
    return RunResult(run, cockpit.latest(), evaluate(model, x_test, y_test))


@dataclass
class CharCorpus:
    """A character corpus encoded as integer ids.

    Attributes:
        text: The raw text.
        vocab: The characters, sorted; id ``i`` is ``vocab[i]``.
        ids: ``[len(text)]`` int64 ids.
    """

    text: str
    vocab: list[str]
    ids: Tensor

    def windows(self, batch_size: int, seq_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random ``[B, T]`` input windows and their next-character targets."""
        return char_windows(self.ids, batch_size, seq_len, gen)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids."""
        return "".join(self.vocab[int(i)] for i in ids)


def char_windows(
    ids: Tensor, batch_size: int, seq_len: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random ``[B, T]`` windows of ``ids`` and their targets (the same windows shifted by one)."""
    start = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
    offsets = torch.arange(seq_len)
    return ids[start[:, None] + offsets], ids[start[:, None] + offsets + 1]


def char_corpus(modules: Sequence[str] = CORPUS_MODULES) -> CharCorpus:
    """English prose from the docstrings of standard-library modules, encoded per character."""
    parts = []
    for name in modules:
        doc = inspect.getdoc(importlib.import_module(name))
        if doc:
            parts.append(doc)
    text = "\n\n".join(parts)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    return CharCorpus(text, vocab, ids)


def parser(doc: str | None, steps: int, logdir: str) -> argparse.ArgumentParser:
    """Argument parser with the options every example has: ``--steps``, ``--logdir``, ``--seed``."""
    first_line = (doc or "").strip().splitlines()[0] if doc else None
    p = argparse.ArgumentParser(description=first_line)
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    p.add_argument(
        "--logdir", type=Path, default=Path(logdir), help=f"log root (default {logdir})"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace runs of an earlier call in --logdir"
    )
    return p


def dashboard_hints(run: str | os.PathLike) -> list:
    """The hints the dashboard shows for a run (:func:`app.hints.hints` on its whole log)."""
    from app.hints import hints
    from cockpit.logreader import read_histograms, read_log

    return hints(read_log(run), hists=read_histograms(run))


def setup_logging() -> None:
    """Report through ``logging`` at INFO (a no-op when logging is already configured)."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


def finite_median(values) -> float:
    """Median of the finite values (NaN when there are none)."""
    vals = sorted(float(v) for v in values if math.isfinite(float(v)))
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def fresh_run(root: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Return ``root/name`` for a new run.

    Reopening an existing run directory would continue that run (a second sequence of
    steps 0, 1, ... in the same log), so an existing run is refused unless ``overwrite``;
    then it is deleted first, but only if it is a cockpit run (it holds ``meta.json``).

    Raises:
        FileExistsError: If ``root/name`` exists and ``overwrite`` is false, or it exists
            and is not a cockpit run.
    """
    run = Path(root) / name
    if run.exists():
        if not overwrite:
            raise FileExistsError(
                f"{run} exists; pass another --logdir or --overwrite to replace the run"
            )
        if not (run / "meta.json").exists():
            raise FileExistsError(f"{run} exists and is not a cockpit run; not deleting it")
        shutil.rmtree(run)
    return run
