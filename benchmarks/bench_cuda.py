"""Workload B on CUDA: our configurations beside the references, a table per run.

``bash benchmarks/cuda_run.sh OUT`` on a GPU machine runs the CUDA tests and the engine,
reference, curvature and preset suites on B with ``--device cuda --one-process``; their
JSON goes to ``benchmarks/results/cuda/``. This module renders ``benchmarks/results/cuda.md``
from those files, with the CPU ratios of the same configurations (``benchmarks/results``)
beside them, and the README shows it (block ``cuda``, :mod:`benchmarks.readme`)::

    python -m benchmarks.bench_cuda            # re-render cuda.md (and the README block)

Only the standard library is imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: (section, [(label, ours: (file, config), reference: (file, config) or None)]).
#: File keys: ``engine``, ``reference``, ``curvature``, ``presets:ours``, ``presets:reference``.
ROWS: list[tuple[str, list[tuple[str, tuple[str, str], tuple[str, str] | None, str]]]] = [
    (
        "first-order quantities",
        [
            ("engine attached, idle", ("engine", "idle"), None, ""),
            ("batch L2", ("engine", "batch_l2"), ("reference", "backpack_batch_l2"), "BatchL2Grad"),
            ("Gram (BatchDot)", ("engine", "gram"), None, ""),
            (
                "second moment",
                ("engine", "second_moment"),
                ("reference", "backpack_sum_grad_squared"),
                "SumGradSquared",
            ),
            ("variance", ("engine", "variance"), ("reference", "backpack_variance"), "Variance"),
            ("grad dot", ("engine", "grad_dot"), None, ""),
            ("projection", ("engine", "projection"), None, ""),
            ("1D histogram", ("engine", "hist1d"), None, ""),
            ("2D histogram", ("engine", "hist2d"), None, ""),
            (
                "all first-order together",
                ("engine", "first_order_all"),
                ("reference", "backpack_first_order"),
                "its four first-order extensions",
            ),
            (
                "individual gradients",
                ("engine", "individual_grads"),
                ("reference", "backpack_batch_grad"),
                "BatchGrad",
            ),
            (
                "torch.func vmap(grad)",
                ("engine", "torch_func"),
                ("reference", "opacus_grad_sample"),
                "Opacus",
            ),
        ],
    ),
    (
        "curvature",
        [
            (
                "diag GGN, exact",
                ("curvature", "diag_ggn"),
                ("curvature", "backpack_diag_ggn"),
                "DiagGGNExact",
            ),
            (
                "diag GGN, MC (M=1)",
                ("curvature", "diag_ggn_mc"),
                ("curvature", "backpack_diag_ggn_mc"),
                "DiagGGNMC",
            ),
            (
                "diag Hessian",
                ("curvature", "diag_hessian"),
                ("curvature", "backpack_diag_hessian"),
                "DiagHessian",
            ),
            ("Hutchinson trace, K=16", ("curvature", "hutchinson_trace"), None, ""),
            ("max eigenvalue, Lanczos cold", ("curvature", "max_ev_cold"), None, ""),
            ("max eigenvalue, Lanczos warm", ("curvature", "max_ev"), None, ""),
            ("everything", ("curvature", "everything"), None, ""),
        ],
    ),
    (
        "presets (Cockpit API)",
        [
            (
                "economy",
                ("presets:ours", "ours_economy"),
                ("presets:reference", "ref_economy"),
                "Cockpit 1.0.2",
            ),
            (
                "business",
                ("presets:ours", "ours_business"),
                ("presets:reference", "ref_business"),
                "Cockpit 1.0.2",
            ),
            ("business, MC curvature", ("presets:ours", "ours_business_mc"), None, ""),
            (
                "full",
                ("presets:ours", "ours_full"),
                ("presets:reference", "ref_full"),
                "Cockpit 1.0.2",
            ),
        ],
    ),
]


def _load(root: Path) -> dict[str, dict]:
    """``{file key: suite JSON}`` of the suites under ``root`` (missing ones left out)."""
    out: dict[str, dict] = {}
    for name in ("engine", "reference", "curvature"):
        path = root / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    path = root / "presets.json"
    if path.exists():
        presets = json.loads(path.read_text())
        out["presets:ours"] = presets.get("ours") or {}
        out["presets:reference"] = presets.get("reference") or {}
    return out


def _entry(data: dict[str, dict], where: tuple[str, str] | None, w: str = "B") -> dict | None:
    if where is None:
        return None
    suite = data.get(where[0]) or {}
    return ((suite.get("configs") or {}).get(where[1]) or {}).get("results", {}).get(w)


def _ratio(e: dict | None, spread: bool = True) -> str:
    if not e:
        return "—"
    if e.get("status") != "ok":
        return e.get("status", "?").split(":")[0]
    text = f"{e['ratio_median']:.2f}x"
    return text + (f" ({e['ratio_min']:.2f}–{e['ratio_max']:.2f})" if spread else "")


def _ms(e: dict | None) -> str:
    if not e or e.get("status") != "ok":
        return "—"
    return f"{e['plain_ms']:.2f} / {e['config_ms']:.1f}"


def _mib(e: dict | None) -> str:
    mem = (e or {}).get("memory") or {}
    if mem.get("status") != "ok" or "cuda_step_mib" not in mem:
        return "—"
    return f"{mem['cuda_step_mib']:.0f}"


#: Earlier runs shown below the latest one: (subdirectory of ``results/cuda``, heading).
#: The H200 run is the last one that measured every suite and every reference.
ARCHIVED: tuple[tuple[str, str], ...] = (
    ("run4_h200_1d66a5e", "B on CUDA: the H200 run with every reference"),
)


def _describe(gpu: dict[str, dict]) -> str:
    """Machine, dates, commits and repetitions of the suites in ``gpu``, as one paragraph."""
    metas = {name: s.get("meta") or {} for name, s in gpu.items()}
    meta = next((m for m in metas.values() if m.get("gpu")), next(iter(metas.values())))
    dates = sorted(m["date"] for m in metas.values() if m.get("date"))
    by_commit: dict[str, list[str]] = {}
    reps: dict[int, list[str]] = {}
    for name, m in metas.items():
        if m.get("git_commit"):
            by_commit.setdefault(m["git_commit"], []).append(name)
        if (m.get("options") or {}).get("reps"):
            reps.setdefault(m["options"]["reps"], []).append(name)
    if len(by_commit) <= 1:
        commit = next(iter(by_commit), "?")
    else:  # suites re-measured at different commits
        commit = ", ".join(f"{c} ({', '.join(sorted(names))})" for c, names in by_commit.items())
    if len(reps) <= 1:
        rep_text = f"{next(iter(reps), 10)} interleaved repetitions"
    else:
        rep_text = "interleaved repetitions: " + ", ".join(
            f"{r} ({', '.join(sorted(names))})" for r, names in sorted(reps.items())
        )
    refs = [
        label
        for key, label in (
            ("reference", "BackPACK 1.7.1 and Opacus 1.6.0"),
            ("presets:reference", "Cockpit 1.0.2"),
        )
        if (gpu.get(key) or {}).get("configs")
    ]
    if "curvature" in gpu and any(
        n.startswith("backpack_") for n in (gpu["curvature"].get("configs") or {})
    ):
        refs.insert(0, "BackPACK's curvature extensions")
    plain = [
        e["plain_ms"]
        for _, rows in ROWS
        for _, ours_at, _, _ in rows
        for e in [_entry(gpu, ours_at)]
        if e and e.get("status") == "ok"
    ] or [float("nan")]
    plain_mib = ((gpu.get("engine") or {}).get("plain_memory") or {}).get("B", {})
    missing = [k for k in ("engine", "reference", "curvature", "presets:ours") if k not in gpu]
    return (
        f"{meta.get('gpu', '?')} (torch {meta.get('torch', '?')}, Python "
        f"{meta.get('python', '?')}), {dates[0] if dates else '?'} to "
        f"{dates[-1] if dates else '?'}, our code at {commit}; "
        + (
            f"the references ({', '.join(refs)}) on the same machine and torch"
            if refs
            else "no reference measured in this run"
        )
        + (f"; not measured in this run: {', '.join(missing)} (—)" if missing else "")
        + ". Median ratio to a plain fwd+bwd+SGD step in the same process "
        f"(min–max), {rep_text} of ≥ 0.1 s plain blocks (configuration "
        "blocks capped at 1 s), one process per suite. A plain step takes "
        f"{min(plain):.1f}–{max(plain):.1f} ms here (N = 128, 3C3D)"
        + (f" and {plain_mib['cuda_step_mib']:.0f} MiB of CUDA memory" if plain_mib else "")
        + "."
    )


def _table(gpu: dict[str, dict], cpu: dict[str, dict]) -> list[str]:
    lines = [
        "| configuration | ours | reference | ours ms (plain / config) | CUDA MiB ours / ref "
        "| CPU ours / ref |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for section, rows in ROWS:
        lines.append(f"| *{section}* | | | | | |")
        for label, ours_at, ref_at, ref_label in rows:
            o, r = _entry(gpu, ours_at), _entry(gpu, ref_at)
            ref = f"{_ratio(r)} {ref_label}".strip() if ref_at else ""
            mib = _mib(o) + (f" / {_mib(r)}" if ref_at else "")
            co, cr = _entry(cpu, ours_at), _entry(cpu, ref_at)
            cpu_text = _ratio(co, spread=False) + (
                f" / {_ratio(cr, spread=False)}" if ref_at else ""
            )
            lines.append(f"| {label} | {_ratio(o)} | {ref} | {_ms(o)} | {mib} | {cpu_text} |")
    return lines


def render(cuda_dir: Path = RESULTS / "cuda", cpu_dir: Path = RESULTS) -> str | None:
    """The Markdown of ``cuda.md``; None when ``cuda_dir`` holds no results.

    One section for the latest run (``cuda_dir``), then one per :data:`ARCHIVED` run
    that ``cuda_dir`` holds, each described by its own suites' metadata.
    """
    gpu, cpu = _load(cuda_dir), _load(cpu_dir)
    if not gpu:
        return None
    lines = [
        "# Workload B on CUDA",
        "",
        "Measured by `bash benchmarks/cuda_run.sh OUT` (or its stages alone) on a lent GPU "
        "machine. CUDA MiB: `torch.cuda.max_memory_allocated` during two steps minus what "
        "was allocated before them. CPU: the same configuration's ratio in the CPU tables "
        "above (2 threads).",
        "",
        "## B on CUDA",
        "",
        _describe(gpu),
        "",
        *_table(gpu, cpu),
    ]
    for sub, heading in ARCHIVED:
        old = _load(cuda_dir / sub)
        if old:
            lines += ["", f"## {heading}", "", _describe(old), "", *_table(old, cpu)]
    return "\n".join(lines) + "\n"


def write_markdown(cuda_dir: Path = RESULTS / "cuda", out: Path = RESULTS / "cuda.md") -> bool:
    """(Re)write ``cuda.md``; False when there are no CUDA results."""
    text = render(cuda_dir, out.parent)
    if text is None:
        return False
    out.write_text(text)
    return True


if __name__ == "__main__":
    ok = write_markdown()
    from benchmarks.readme import README, update_readme

    changed = update_readme(README, RESULTS)
    state = "written" if ok else "not written (no results)"
    print(f"cuda.md {state}; README: {changed or 'current'}")
    sys.exit(0 if ok else 1)
