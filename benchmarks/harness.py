"""Timing and memory harness: a configuration's cost relative to a plain training step.

A *configuration* (:class:`Config`) turns a :class:`Context` (a fresh model copy, the
batch, the loss) into a ``step()`` function that does one full training step
(zero_grad, forward, backward with whatever it gathers, SGD update). The plain step is
the configuration :data:`PLAIN`.

Measurements, each in its own process (so an OOM or a crash only loses that entry):

- **time** (:func:`time_config`): plain and configuration step on two identical model
  copies in the same process, ``torch.set_num_threads(2)``, warm-up first, then
  ``reps`` interleaved blocks ``plain, config, plain, config, …``. A block runs the step
  ``k`` times, with ``k`` calibrated so a plain block lasts ``min_block_s`` (tiny models
  would otherwise be timer noise) and a configuration block at most ``max_block_s``.
  Reported: the median of the per-repetition ratios ``t_config / t_plain`` and their
  range (min–max), plus the median step times.
- **memory** (:func:`memory_config`): a fresh process builds only this configuration and
  runs a few steps. ``peak_rss`` is ``getrusage(RUSAGE_SELF).ru_maxrss``;
  ``step_rss = peak_rss - RSS before the first step`` is the step's footprint (activations,
  gradients, the configuration's buffers). The suite reports the RSS growth over the
  plain step (``peak_rss - peak_rss(plain)``) and the ratio of footprints. On CUDA,
  ``torch.cuda.max_memory_allocated`` is reported the same way.
- a per-process memory cap: ``RLIMIT_AS`` = address space after start-up + ``cap``
  (CPU only); an allocation failure yields ``"skipped: exceeds <cap> GiB"``.

This module imports only ``torch`` and the standard library: it also runs in
``.bench-venv`` (see :mod:`benchmarks.bench_reference`).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.workloads import Workload, get

__all__ = [
    "Config",
    "Context",
    "Options",
    "Launcher",
    "PLAIN",
    "plain_step",
    "time_config",
    "memory_config",
    "worker_main",
    "run_suite",
    "fmt_ratio",
    "plain_mem_text",
]

NUM_THREADS = 2
StepFn = Callable[[], None]


@dataclass
class Context:
    """What a configuration's ``setup`` gets: its own model copy and the batch.

    Attributes:
        workload: The workload.
        model: A model copy owned by this configuration (same initial weights as the
            plain step's copy).
        loss_fn: A fresh loss module (``reduction="mean"``).
        x: Inputs ``[N, ...]``.
        y: Labels ``[N]``.
        device: ``"cpu"`` or ``"cuda"``.
        lr: SGD learning rate.
    """

    workload: Workload
    model: nn.Module
    loss_fn: nn.Module
    x: Tensor
    y: Tensor
    device: str
    lr: float = 0.01

    @property
    def n(self) -> int:
        """Batch size N."""
        return self.x.shape[0]

    def sgd(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Plain SGD over ``model``'s (default: this context's model's) parameters."""
        return torch.optim.SGD((model or self.model).parameters(), lr=self.lr)

    def loss(self, model: nn.Module | None = None) -> Tensor:
        """Forward pass and loss on the batch."""
        return self.loss_fn((model or self.model)(self.x), self.y)


@dataclass(frozen=True)
class Config:
    """A benchmarked configuration.

    Attributes:
        name: Key in the results (``snake_case``).
        label: Shown in tables.
        setup: ``setup(ctx) -> step``; everything done here (hooks, directions,
            ``extend``) is set-up cost and not timed. A ``step.stats()`` attribute, if
            the step function has one, returns a JSON-serializable summary of the steps
            it ran (e.g. Lanczos iteration counts), stored as ``"stats"`` in the timing.
        group: ``"ours"``, ``"baseline"`` or ``"reference"``.
        note: One line shown under the table.
    """

    name: str
    label: str
    setup: Callable[[Context], StepFn]
    group: str = "ours"
    note: str = ""


def plain_step(ctx: Context) -> StepFn:
    """The baseline: ``zero_grad``, forward, ``loss.backward()``, ``SGD.step()``."""
    opt = ctx.sgd()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        ctx.loss().backward()
        opt.step()

    return step


PLAIN = Config("plain", "plain step (noise floor: plain vs plain)", plain_step, "baseline")


@dataclass
class Options:
    """Measurement options (sent to workers as JSON).

    Attributes:
        quick: Small N, few repetitions (smoke test).
        device: ``"cpu"`` or ``"cuda"``.
        reps: Interleaved repetitions (≥ 10 for the real benchmark).
        warmup: Untimed steps of each kind before calibrating.
        min_block_s: Target duration of one plain block.
        max_block_s: Upper bound on one configuration block (caps k for slow ones).
        mem_steps: Steps in a memory measurement.
        mem_cap_gib: Per-process address-space cap above start-up (CPU).
        timeout_s: Per-process wall-clock limit.
        memory: Whether to run the memory measurements.
        memory_workloads: Restrict memory runs to these workloads (``None``: all).
        memory_configs: Restrict memory runs to these configurations (``None``: all).
        one_process: Time every configuration in one process per suite (and, on CUDA,
            measure memory in one more), instead of a process per measurement. For a
            GPU machine on a short lease, where each process spends seconds starting
            CUDA; CUDA peak memory is reset per measurement and stays valid, while the
            CPU's peak RSS would not, so on the CPU this mode measures no memory.
    """

    quick: bool = False
    device: str = "cpu"
    reps: int = 10
    warmup: int = 2
    min_block_s: float = 0.5
    max_block_s: float = 5.0
    mem_steps: int = 2
    mem_cap_gib: float = 8.0
    timeout_s: float = 900.0
    memory: bool = True
    memory_workloads: list[str] | None = None
    memory_configs: list[str] | None = None
    one_process: bool = False

    @classmethod
    def for_mode(cls, quick: bool, **overrides) -> Options:
        """Defaults for the full or the quick (smoke-test) benchmark."""
        base = (
            cls(
                quick=True,
                reps=3,
                warmup=1,
                min_block_s=0.01,
                mem_steps=1,
                timeout_s=20.0,
                memory_workloads=["B"],
                memory_configs=["plain", "first_order_all"],
            )
            if quick
            else cls()
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(base, k, v)
        return base


# ----------------------------------------------------------------- in the worker
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _context(workload: Workload, model: nn.Module, opts: Options) -> Context:
    x, y = workload.data(workload.batch_size(opts.quick), device=opts.device)
    return Context(workload, model, workload.loss_fn().to(opts.device), x, y, opts.device)


def _block(step: StepFn, k: int, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(k):
        step()
    _sync(device)
    return time.perf_counter() - t0


def time_config(config: Config, workload: Workload, opts: Options) -> dict:
    """Interleaved timing of ``config`` against the plain step in this process."""
    base = workload.model(device=opts.device)
    plain = plain_step(_context(workload, copy.deepcopy(base), opts))
    step = config.setup(_context(workload, copy.deepcopy(base), opts))
    del base
    warm, warm_config = [], []
    for _ in range(max(1, opts.warmup)):
        warm.append(_block(plain, 1, opts.device))
        warm_config.append(_block(step, 1, opts.device))
    gc.collect()
    k = max(1, math.ceil(opts.min_block_s / max(min(warm), 1e-6)))
    # ... but a slow configuration must not turn one block into minutes
    k = max(1, min(k, math.floor(opts.max_block_s / max(min(warm_config), 1e-6))))
    ratios, cpu_ratios, t_plain, t_config = [], [], [], []
    for _ in range(opts.reps):
        c0 = time.process_time()
        a = _block(plain, k, opts.device)
        c1 = time.process_time()
        b = _block(step, k, opts.device)
        c2 = time.process_time()
        t_plain.append(a / k)
        t_config.append(b / k)
        ratios.append(b / a)
        cpu_ratios.append((c2 - c1) / max(c1 - c0, 1e-9))
    out = {
        "status": "ok",
        "n": workload.batch_size(opts.quick),
        "k": k,
        "reps": opts.reps,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratios": cpu_ratios,
        "plain_ms": 1e3 * statistics.median(t_plain),
        "config_ms": 1e3 * statistics.median(t_config),
    }
    stats = getattr(step, "stats", None)
    if callable(stats):  # what the configuration reports about its steps (e.g. HVP counts)
        out["stats"] = stats()
    return out


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0  # pragma: no cover


def _vmsize_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover


def memory_config(config: Config, workload: Workload, opts: Options) -> dict:
    """Peak memory of ``opts.mem_steps`` steps of ``config`` alone (fresh process)."""
    step = config.setup(_context(workload, workload.model(device=opts.device), opts))
    gc.collect()
    cuda = opts.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    rss0 = _rss_kib()
    for _ in range(opts.mem_steps):
        step()
    _sync(opts.device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {
        "status": "ok",
        "n": workload.batch_size(opts.quick),
        "peak_rss_mib": peak / 1024,
        "base_rss_mib": rss0 / 1024,
        "step_rss_mib": max(0, peak - rss0) / 1024,
    }
    if opts.one_process:  # the process's peak RSS holds earlier measurements: not this one's
        out = {k: v for k, v in out.items() if "rss" not in k}
    if cuda:
        top = torch.cuda.max_memory_allocated()
        out["cuda_peak_mib"] = top / 2**20
        out["cuda_step_mib"] = (top - cuda0) / 2**20
    return out


def _is_oom(err: BaseException | str) -> bool:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    markers = ("MemoryError", "can't allocate memory", "bad_alloc", "out of memory", "OutOfMemory")
    return any(m in text for m in markers)


def _setup_process(opts: Options) -> None:
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(0)
    torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool before capping
    if opts.mem_cap_gib and not opts.device.startswith("cuda"):
        limit = _vmsize_bytes() + int(opts.mem_cap_gib * 2**30)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def worker_main(configs: dict[str, Config], spec_json: str) -> int:
    """Entry point of a measurement process.

    Args:
        configs: The configurations this module knows, by name (plus :data:`PLAIN`).
        spec_json: ``{"mode": "time"|"memory", "configs": [...], "workloads": [...],
            "options": {...}, "out": path}``.

    Returns:
        The exit code; results (``{config: {workload: result}}``) are written to
        ``spec["out"]`` after each measurement.
    """
    spec = json.loads(spec_json)
    opts = Options(**spec["options"])
    _setup_process(opts)
    known = {PLAIN.name: PLAIN, **configs}
    measure = time_config if spec["mode"] == "time" else memory_config
    results: dict[str, dict[str, dict]] = {}
    for name in spec["configs"]:
        for key in spec["workloads"]:
            try:
                entry = measure(known[name], get(key), opts)
            except Exception as err:  # noqa: BLE001 - one failing entry must not stop the rest
                if _is_oom(err):
                    entry = {"status": f"skipped: exceeds {opts.mem_cap_gib:g} GiB"}
                else:
                    first = (str(err).splitlines() or [""])[0][:300]
                    entry = {
                        "status": f"failed: {type(err).__name__}: {first}",
                        "traceback": traceback.format_exc(limit=8),
                    }
            results.setdefault(name, {})[key] = entry
            gc.collect()
            Path(spec["out"]).write_text(json.dumps(results))
    return 0


# ----------------------------------------------------------------- in the parent
@dataclass
class Launcher:
    """How to start a worker: ``python -m module _worker SPEC`` in ``cwd`` with ``env``."""

    python: str
    module: str
    cwd: str
    env: dict[str, str] | None = None

    def run(self, spec: dict, timeout_s: float) -> dict[str, dict[str, dict]]:
        """Run one worker; return ``{config: {workload: result}}`` (failures become entries)."""
        with tempfile.TemporaryDirectory(prefix="cockpit-bench-") as tmp:
            out = Path(tmp) / "result.json"
            spec = {**spec, "out": str(out)}
            cmd = [self.python, "-m", self.module, "_worker", json.dumps(spec)]
            env = dict(self.env if self.env is not None else os.environ)
            env.setdefault("OMP_NUM_THREADS", str(NUM_THREADS))
            env.setdefault("MKL_NUM_THREADS", str(NUM_THREADS))
            try:
                proc = subprocess.run(
                    cmd, cwd=self.cwd, env=env, capture_output=True, text=True, timeout=timeout_s
                )
                stderr, rc = proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as err:
                stderr, rc = f"timeout after {timeout_s:g} s", None
                stderr += "\n" + (err.stderr.decode() if isinstance(err.stderr, bytes) else "")
            done = json.loads(out.read_text()) if out.exists() else {}
        for name in spec["configs"]:
            got = done.setdefault(name, {})
            for key in spec["workloads"]:
                if key in got:
                    continue
                if rc is None:
                    got[key] = {"status": f"skipped: timeout after {timeout_s:g} s"}
                elif _is_oom(stderr) or rc in (-9, 137):
                    cap = spec["options"].get("mem_cap_gib")
                    got[key] = {"status": f"skipped: exceeds {cap:g} GiB (process died, rc={rc})"}
                else:
                    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
                    got[key] = {
                        "status": f"failed: rc={rc}: {tail[0][:300]}",
                        "stderr": stderr[-3000:],
                    }
        return done


def machine_info(device: str) -> dict:
    """Where the numbers come from."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "num_threads": NUM_THREADS,
        "device": device,
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?"
            )
    except OSError:  # pragma: no cover
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass
class Suite:
    """Results of one suite run (serialized to JSON by :meth:`to_json`)."""

    meta: dict
    configs: dict[str, dict] = field(default_factory=dict)
    plain_memory: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"meta": self.meta, "plain_memory": self.plain_memory, "configs": self.configs}


def _with_memory(entry: dict, mem: dict | None, plain_mem: dict | None) -> dict:
    if mem is None:
        return entry
    entry = dict(entry)
    entry["memory"] = mem
    if mem.get("status") == "ok" and plain_mem and plain_mem.get("status") == "ok":
        if "peak_rss_mib" in mem and "peak_rss_mib" in plain_mem:
            entry["rss_growth_mib"] = mem["peak_rss_mib"] - plain_mem["peak_rss_mib"]
        if plain_mem.get("step_rss_mib", 0) > 0 and "step_rss_mib" in mem:
            entry["mem_ratio"] = mem["step_rss_mib"] / plain_mem["step_rss_mib"]
        if "cuda_step_mib" in mem and plain_mem.get("cuda_step_mib"):
            entry["cuda_mem_ratio"] = mem["cuda_step_mib"] / plain_mem["cuda_step_mib"]
    elif mem.get("status") != "ok" and entry.get("status") == "ok":
        entry["memory_status"] = mem.get("status")
    return entry


def run_suite(
    configs: Iterable[Config],
    workloads: list[str],
    opts: Options,
    launcher: Launcher,
    log: Callable[[str], None] = lambda s: None,
    meta: dict | None = None,
) -> Suite:
    """Measure every configuration on every workload, one process per measurement.

    Each (configuration, workload) is timed in its own process, and each memory
    measurement gets a fresh one. In quick mode (a smoke test) one process times
    everything, since start-up costs seconds per process, and memory is measured
    only for ``opts.memory_configs``. With ``opts.one_process`` one process times
    everything and, on CUDA, one more measures every configuration's CUDA memory.
    """
    configs = list(configs)
    suite = Suite(meta={**machine_info(opts.device), **(meta or {}), "options": vars(opts)})
    mem_keys = [w for w in workloads if opts.memory_workloads is None or w in opts.memory_workloads]
    spec_opts = vars(opts)

    def launch(mode: str, names: list[str], keys: list[str]) -> dict[str, dict[str, dict]]:
        if not keys or not names:
            return {}
        spec = {"mode": mode, "configs": names, "workloads": keys, "options": spec_opts}
        return launcher.run(spec, opts.timeout_s * len(names) * len(keys))

    def wanted(name: str) -> bool:
        return opts.memory and (opts.memory_configs is None or name in opts.memory_configs)

    shared = opts.quick or opts.one_process
    shared_memory: dict[str, dict[str, dict]] = {}
    if opts.one_process and opts.memory and opts.device.startswith("cuda"):
        names = [n for n in dict.fromkeys([PLAIN.name, *(c.name for c in configs)]) if wanted(n)]
        shared_memory = launch("memory", names, mem_keys)

    def memory(name: str) -> dict[str, dict]:
        if not wanted(name) or (opts.one_process and not shared_memory):
            return {}
        if shared_memory:
            return shared_memory.get(name, {})
        return {w: launch("memory", [name], [w])[name][w] for w in mem_keys}

    if opts.memory:
        suite.plain_memory = memory(PLAIN.name)
        log(f"  memory of the plain step: {_fmt_mem(suite.plain_memory)}")
    batch = launch("time", [c.name for c in configs], workloads) if shared else {}
    for config in configs:
        t0 = time.perf_counter()
        if shared:
            timing = batch[config.name]
        else:
            timing = {w: launch("time", [config.name], [w])[config.name][w] for w in workloads}
        memory_results = memory(config.name) if config.name != PLAIN.name else suite.plain_memory
        results = {
            w: _with_memory(timing[w], memory_results.get(w), suite.plain_memory.get(w))
            for w in workloads
        }
        suite.configs[config.name] = {
            "label": config.label,
            "group": config.group,
            "note": config.note,
            "results": results,
        }
        cells = "  ".join(f"{w}: {fmt_ratio(results[w])}" for w in workloads)
        log(f"  {config.name:<18} {cells}  ({time.perf_counter() - t0:.0f} s)")
    suite.meta["loadavg_end"] = list(os.getloadavg())
    return suite


def _fmt_mem(mem: dict[str, dict]) -> str:
    def one(m: dict) -> str:
        if m.get("status") != "ok":
            return m.get("status", "?")
        rss = f"{m['step_rss_mib']:.0f} MiB" if "step_rss_mib" in m else ""
        gpu = f"CUDA {m['cuda_step_mib']:.0f} MiB" if "cuda_step_mib" in m else ""
        return ", ".join(t for t in (rss, gpu) if t)

    return ", ".join(f"{w}: {one(m)}" for w, m in mem.items())


def plain_mem_text(m: dict, gib: bool = False) -> str:
    """A plain step's memory: ``"12 MiB (peak 345)"``, or its CUDA figure when RSS is absent.

    In ``one_process`` mode (CUDA) a measurement carries no RSS (see :class:`Options`).
    """
    if "step_rss_mib" not in m:
        return f"CUDA {m.get('cuda_step_mib', float('nan')):.0f} MiB"
    peak = f"{m['peak_rss_mib'] / 1024:.2f} GiB" if gib else f"{m['peak_rss_mib']:.0f}"
    return f"{m['step_rss_mib']:.0f} MiB (peak {peak})"


def fmt_ratio(entry: dict | None, spread: bool = True) -> str:
    """``"1.23x (1.10–1.40)"``, or the entry's status when it has no ratio."""
    if not entry:
        return "—"
    if entry.get("status") != "ok":
        return entry.get("status", "?").split(":")[0] if not spread else entry.get("status", "?")
    text = f"{entry['ratio_median']:.2f}x"
    if spread:
        text += f" ({entry['ratio_min']:.2f}–{entry['ratio_max']:.2f})"
    return text


def worker_cli(configs: dict[str, Config], argv: list[str] | None = None) -> int | None:
    """``python -m <bench module> _worker SPEC``: run a worker; ``None`` if not a worker call."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "_worker":
        return worker_main(configs, argv[1])
    return None
