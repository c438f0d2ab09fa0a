"""Instruments: diagnostics computed every tracked step from what the engine gathered.

Each instrument lives in its own module and registers itself under its log name.
``preset(name)`` returns the instruments of a Cockpit preset.

Example:
    >>> from instruments import preset
    >>> [i.name for i in preset("economy")][:4]
    ['alpha', 'distance', 'grad_hist_1d', 'grad_norm']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from instruments import (  # noqa: F401  (register the built-ins)
    alpha,
    cabs,
    distance,
    early_stopping,
    grad_norm,
    gradient_tests,
    hess_max_ev,
    hess_trace,
    histograms,
    hyperparameters,
    loss,
    mean_gsnr,
    tic,
    update_size,
)
from instruments.base import INSTRUMENTS, Instrument, PanelSpec, register_instrument

__all__ = [
    "INSTRUMENTS",
    "Instrument",
    "PanelSpec",
    "register_instrument",
    "get",
    "preset",
    "PRESETS",
]

_ECONOMY = (
    "alpha",
    "distance",
    "grad_hist_1d",
    "grad_norm",
    "inner_test",
    "loss",
    "norm_test",
    "ortho_test",
    "update_size",
)
#: Cockpit's presets (MATH.md), plus the free ``batch_size`` and ``hyperparameters``.
PRESETS: dict[str, tuple[str, ...]] = {
    "economy": _ECONOMY + ("batch_size", "hyperparameters"),
    "business": _ECONOMY + ("tic_diag", "hess_trace", "batch_size", "hyperparameters"),
    "full": _ECONOMY
    + ("tic_diag", "hess_trace", "hess_max_ev", "grad_hist_2d", "batch_size", "hyperparameters"),
}


def get(name: str, schedule: Callable[[int], bool] | None = None, **config) -> Instrument:
    """Instantiate a registered instrument by its log name.

    Example:
        >>> from cockpit import schedules
        >>> from instruments import get
        >>> trace = get("hess_trace", schedules.every(10), curvature="ggn")
        >>> trace.schedule, trace.config()["curvature"], trace.requires
        (every(k=10, offset=0), 'ggn', frozenset({DiagGGN(mc_samples=0)}))
        >>> get("grad_nrom")
        Traceback (most recent call last):
        ...
        ValueError: unknown instrument 'grad_nrom'; known: [...]
    """
    try:
        cls = INSTRUMENTS[name]
    except KeyError:
        raise ValueError(f"unknown instrument {name!r}; known: {sorted(INSTRUMENTS)}") from None
    return cls(schedule, **config)


def preset(name: str, schedule: Callable[[int], bool] | None = None) -> list[Instrument]:
    """The instruments of preset ``"economy"``, ``"business"`` or ``"full"``.

    Example:
        >>> from instruments import PRESETS, preset
        >>> sorted(set(PRESETS["business"]) - set(PRESETS["economy"]))  # the curvature additions
        ['hess_trace', 'tic_diag']
        >>> [i.name for i in preset("full")][-4:]
        ['hess_max_ev', 'grad_hist_2d', 'batch_size', 'hyperparameters']
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return [get(n, schedule) for n in PRESETS[name] if n in INSTRUMENTS]


def resolve_instruments(
    spec: str | Sequence[str | Instrument], default_schedule: Callable[[int], bool]
) -> list[Instrument]:
    """Turn preset names, instrument names and/or objects into instruments with schedules.

    A preset inside a list expands to its instruments; an instrument named or configured
    explicitly replaces the preset's default one of the same name (wherever it appears
    in the list), so ``["business", get("hess_trace", curvature="ggn_mc")]`` is the
    business preset with the Monte-Carlo trace. Naming one instrument explicitly twice
    is an error.

    Example:
        >>> from cockpit import schedules
        >>> from instruments import get, resolve_instruments
        >>> insts = resolve_instruments(
        ...     ["business", get("hess_trace", curvature="ggn_mc"), "grad_hist_2d"],
        ...     schedules.every(1),
        ... )
        >>> [i.name for i in insts][-4:], insts[-4].config()["curvature"]
        (['hess_trace', 'batch_size', 'hyperparameters', 'grad_hist_2d'], 'ggn_mc')
        >>> resolve_instruments(["loss", "loss"], schedules.every(1))
        Traceback (most recent call last):
        ...
        ValueError: instrument 'loss' given twice
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    explicit: dict[str, Instrument] = {}
    expanded: list[tuple[bool, Instrument]] = []  # (from a preset, instrument)
    for item in items:
        if isinstance(item, str) and item in PRESETS:
            expanded.extend((True, inst) for inst in preset(item))
            continue
        inst = get(item) if isinstance(item, str) else item
        if not isinstance(inst, Instrument):
            raise TypeError(f"instruments must be names or Instrument objects, got {item!r}")
        if inst.name in explicit:
            raise ValueError(f"instrument {inst.name!r} given twice")
        explicit[inst.name] = inst
        expanded.append((False, inst))
    out: list[Instrument] = []
    seen: set[str] = set()
    for from_preset, inst in expanded:
        if from_preset and inst.name in explicit:
            inst = explicit[inst.name]  # the explicit one takes the preset's place
        if inst.name in seen:
            continue  # in two presets, or explicit and already placed
        if inst.schedule is None:
            inst.schedule = default_schedule
        seen.add(inst.name)
        out.append(inst)
    return out
