"""Schedules: which steps an instrument tracks.

A schedule is a callable ``step -> bool`` with a ``config`` dict for the run metadata.

Example:
    >>> from cockpit import schedules
    >>> [s for s in range(10) if schedules.every(3, offset=1)(s)]
    [1, 4, 7]
    >>> [s for s in range(100) if schedules.log_spaced(1, 100, 5)(s)]
    [1, 3, 10, 32]
    >>> schedules.at([0, 5])(5)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["Schedule", "every", "log_spaced", "at"]


class Schedule:
    """A step predicate with a description.

    Args:
        fn: ``step -> bool``.
        config: JSON-serializable description (kind and arguments).

    Example:
        A custom schedule (the run metadata records ``config``):

        >>> from cockpit.schedules import Schedule
        >>> warmup = Schedule(lambda s: s < 3 or s % 10 == 0, {"kind": "warmup", "n": 3})
        >>> [s for s in range(25) if warmup(s)]
        [0, 1, 2, 10, 20]
        >>> warmup, warmup.config
        (warmup(n=3), {'kind': 'warmup', 'n': 3})
    """

    def __init__(self, fn, config: dict) -> None:
        self._fn = fn
        self.config = config

    def __call__(self, step: int) -> bool:
        """Whether ``step`` is tracked."""
        return bool(self._fn(step))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "kind")
        return f"{self.config['kind']}({args})"


def every(k: int, offset: int = 0) -> Schedule:
    """Track steps ``offset, offset + k, offset + 2k, …``.

    Args:
        k: Interval (≥ 1).
        offset: First tracked step (≥ 0).

    Returns:
        The schedule.

    Example:
        >>> from cockpit.schedules import every
        >>> [s for s in range(12) if every(4, offset=2)(s)]
        [2, 6, 10]
        >>> every(4, offset=2).config
        {'kind': 'every', 'k': 4, 'offset': 2}
    """
    if int(k) != k or k < 1:
        raise ValueError(f"every(k): k must be a positive integer, got {k!r}")
    if int(offset) != offset or offset < 0:
        raise ValueError(
            f"every(offset=...): offset must be a non-negative integer, got {offset!r}"
        )
    return Schedule(
        lambda s: s >= offset and (s - offset) % k == 0, {"kind": "every", "k": k, "offset": offset}
    )


def log_spaced(start: int, end: int, num: int) -> Schedule:
    """Track ``num`` steps spaced logarithmically in ``[start, end)`` (rounded, deduplicated).

    Args:
        start: First step (≥ 1, as log(0) is undefined).
        end: Upper bound (exclusive, > start).
        num: Number of points before deduplication.

    Returns:
        The schedule: dense early in training, sparse later.

    Example:
        >>> from cockpit.schedules import log_spaced
        >>> track = log_spaced(1, 1000, 7)
        >>> [s for s in range(1000) if track(s)]
        [1, 3, 10, 32, 100, 316]
    """
    if start < 1 or end <= start or num < 1:
        raise ValueError(
            f"log_spaced needs 1 <= start < end and num >= 1, got {start}, {end}, {num}"
        )
    lo, hi = math.log10(start), math.log10(end)
    steps = sorted({int(round(10 ** (lo + (hi - lo) * i / max(num - 1, 1)))) for i in range(num)})
    steps = [s for s in steps if start <= s < end]
    chosen = frozenset(steps)
    return Schedule(
        chosen.__contains__, {"kind": "log_spaced", "start": start, "end": end, "num": num}
    )


def at(steps: Iterable[int]) -> Schedule:
    """Track exactly the given steps.

    Args:
        steps: The step indices to track (any iterable of ints).

    Returns:
        The schedule.

    Example:
        >>> from cockpit.schedules import at
        >>> final = at([0, 99])
        >>> final(99), final(50), final
        (True, False, at(steps=[0, 99]))
    """
    chosen = frozenset(int(s) for s in steps)
    return Schedule(chosen.__contains__, {"kind": "at", "steps": sorted(chosen)})
