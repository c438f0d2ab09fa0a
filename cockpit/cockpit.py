"""The Cockpit: attach to any training loop; every tracked step yields the instruments.

Example:
    >>> import torch
    >>> from cockpit import Cockpit, schedules
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> with Cockpit(model, loss_fn, opt, instruments="economy") as cockpit:
    ...     for step in range(3):
    ...         opt.zero_grad()
    ...         loss = loss_fn(model(x), y)
    ...         with cockpit.step(step, loss):
    ...             loss.backward()
    ...         opt.step()
    >>> {"alpha", "loss", "norm_test"} <= set(cockpit.latest())
    True
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from cockpit import schedules as _schedules
from cockpit import sgd_update
from cockpit.checks import all_finite
from cockpit.engine import Engine
from cockpit.layers.functorch import tensor_outputs
from cockpit.losses import individual_losses
from cockpit.quantities import Gathered, GradDot, Projection
from instruments.base import (
    Histogram,
    Instrument,
    Plan,
    Record,
    Scalar,
    StepContext,
    Update,
    differences,
    host_arrays,
    squared_norms,
)

__all__ = ["Cockpit", "NonFiniteError"]

#: Compute alpha's start-point projections by a forward-mode pass even when the
#: engine's kept factors are available (tests compare the two paths).
FORCE_JVP = False


class NonFiniteError(FloatingPointError):
    """The loss or the gradients of a tracked step are NaN/inf (``on_nonfinite="raise"``).

    Example:
        >>> import math, torch
        >>> from cockpit import Cockpit, NonFiniteError
        >>> model, loss_fn = torch.nn.Linear(2, 1), torch.nn.MSELoss()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(4, 2), torch.full((4, 1), math.inf)  # a broken target
        >>> with Cockpit(model, loss_fn, opt, ["loss"], on_nonfinite="raise") as cockpit:
        ...     loss = loss_fn(model(x), y)
        ...     try:
        ...         with cockpit.step(0, loss):
        ...             loss.backward()
        ...     except NonFiniteError as exc:
        ...         print(exc)
        step 0: the loss or the gradients are not finite; instruments ['loss'] log NaN
    """


@dataclass
class _ModelCall:
    """The last training forward call of the model: inputs, RNG state, output grads."""

    args: tuple
    kwargs: dict
    rng: Tensor
    cuda_rng: list[Tensor] | None
    out_grads: list[Tensor | None]


class Cockpit:
    """Attach instruments to a PyTorch training loop.

    Args:
        model: Any ``nn.Module`` (batch dimension first in every layer's input).
        loss_fn: The loss module used in the loop (``CrossEntropyLoss``, ``MSELoss``,
            ``BCEWithLogitsLoss`` or another with ``reduction`` ``"mean"``/``"sum"``).
            The cockpit learns outputs, targets and individual losses by hooking it.
        optimizer: Any ``torch.optim.Optimizer``; its ``step()`` is hooked to see the
            actual update ``θ_{t+1} − θ_t``.
        instruments: A preset (``"economy"``, ``"business"``, ``"full"``), a list of
            preset names, instrument names and configured
            :class:`~instruments.base.Instrument` objects (mixing is fine; an instrument
            given explicitly replaces a preset's default one of the same name, e.g.
            ``["business", get("hess_trace", curvature="ggn_mc")]``). Instruments
            without their own schedule use ``schedule``.
        logdir: Run directory for the Parquet log (e.g. ``"runs/digits-sgd"``); None
            keeps results in memory only (see :meth:`latest`). An existing run
            directory is continued (resuming): its first step must come after the last
            one it holds, else :meth:`step` raises instead of mixing two runs.
        schedule: Default schedule, ``step -> bool`` (see :mod:`cockpit.schedules`);
            default every step.
        tags: User tags stored in the run metadata.
        fail_mode: For modules without a layer rule: ``"warn"``, ``"silent"`` or
            ``"error"`` (see :class:`~cockpit.engine.Engine`).
        on_nonfinite: ``"warn"`` (log NaN, warn once per instrument, keep training) or
            ``"raise"`` (:class:`NonFiniteError`).
        log_options: Extra keyword arguments for :class:`~cockpit.logwriter.LogWriter`
            (``flush_every_steps``, ``flush_every_seconds``, ``strict``).

    Gradient accumulation over micro-batches is not supported on tracked steps: the
    gradients must be zero (or None) when a tracked step's backward pass starts, since
    per-sample statistics describe one batch. Untracked steps may accumulate freely.

    Example:
        Three instruments and a user metric, logged to a run directory and read back:

        >>> import tempfile, torch
        >>> from cockpit import Cockpit
        >>> from cockpit.logreader import read_log
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))  # [N, D_in], [N]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     cockpit = Cockpit(model, loss_fn, opt, ["loss", "grad_norm", "alpha"], f"{tmp}/run")
        ...     for step in range(3):
        ...         opt.zero_grad()
        ...         loss = loss_fn(model(x), y)
        ...         with cockpit.step(step, loss):
        ...             loss.backward()
        ...         opt.step()
        ...         cockpit.log(step, accuracy=(model(x).argmax(1) == y).float().mean())
        ...     latest = cockpit.latest()
        ...     cockpit.close()
        ...     df = read_log(f"{tmp}/run")
        >>> sorted(latest)
        ['alpha', 'grad_norm', 'loss', 'user.accuracy']
        >>> df.groupby("instrument").step.max().to_dict()  # alpha needs the next step
        {'alpha': 1, 'grad_norm': 2, 'loss': 2, 'user': 2}
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        instruments: str | Sequence[str | Instrument] = "economy",
        logdir: str | os.PathLike | None = None,
        schedule: Callable[[int], bool] | None = None,
        *,
        tags: dict[str, Any] | None = None,
        fail_mode: str = "warn",
        on_nonfinite: str = "warn",
        log_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(loss_fn, nn.Module):
            raise TypeError(
                f"loss_fn must be the loss module used in the loop (an nn.Module), got "
                f"{type(loss_fn).__name__}; wrap a loss function in a module with a "
                "'reduction' attribute"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.on_nonfinite = on_nonfinite
        self.default_schedule = schedule if schedule is not None else _schedules.every(1)
        from instruments import resolve_instruments  # lazy: instruments import cockpit

        self.instruments: list[Instrument] = resolve_instruments(instruments, self.default_schedule)
        self._param_signature = self._signature()
        self.engine = Engine(model, loss_fn, fail_mode=fail_mode)
        self._initial = {k: p.detach().clone() for k, p in self._trainable().items()}
        self._last_step: int | None = None
        self._latest: dict[str, float] = {}
        self._warned_nonfinite: set[str] = set()
        self._call: _ModelCall | None = None
        self._loss_io: tuple[Tensor, Any] | None = None
        self._want_out_grads = False
        self._awaiting: tuple[StepContext, list[Instrument]] | None = None
        self._snapshot: dict[str, Tensor] | None = None
        self._sgd: sgd_update.SGDPlan | None = None
        #: How each step's per-sample projections onto its update were obtained.
        self._update_sources: Counter[str] = Counter()
        self._closed = False
        self._handles = [
            model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
            model.register_forward_hook(self._model_hook),
            loss_fn.register_forward_hook(self._loss_hook),
            optimizer.register_step_pre_hook(self._optimizer_pre_hook),
            optimizer.register_step_post_hook(self._optimizer_post_hook),
        ]
        self.writer = None
        if logdir is not None:
            from cockpit.logwriter import LogWriter

            self.writer = LogWriter(logdir, self._metadata(tags or {}), **(log_options or {}))
        self._resumed_after: int | None = None  # last step an existing run dir already holds
        if self.writer is not None:
            from cockpit.logreader import last_step

            self._resumed_after = last_step(self.writer.run_dir)

    # ---------------------------------------------------------------- helpers
    def _trainable(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.model.named_parameters() if p.requires_grad}

    def _signature(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(k, tuple(p.shape)) for k, p in self.model.named_parameters()]

    def _metadata(self, tags: dict[str, Any]) -> dict[str, Any]:
        groups = []
        for g in self.optimizer.param_groups:
            groups.append({k: v for k, v in g.items() if k != "params" and _jsonable(v)})
        return {
            "model": [
                {
                    "name": k,
                    "shape": list(p.shape),
                    "numel": p.numel(),
                    "requires_grad": p.requires_grad,
                }
                for k, p in self.model.named_parameters()
            ],
            "model_class": type(self.model).__name__,
            "loss": {
                "class": type(self.loss_fn).__name__,
                "reduction": getattr(self.loss_fn, "reduction", None),
            },
            "optimizer": {"class": type(self.optimizer).__name__, "param_groups": groups},
            "instruments": [inst.config() for inst in self.instruments],
            "tags": tags,
        }

    # ------------------------------------------------------------------ hooks
    def _model_pre_hook(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled() or self._closed:
            return
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.get_rng_state_all()
        self._call = _ModelCall(args, kwargs, torch.get_rng_state(), cuda, [])

    def _model_hook(self, module, args, output) -> None:
        call = self._call
        if call is None or not torch.is_grad_enabled() or self._closed:
            return
        outs = tensor_outputs(output)
        call.out_grads = [None] * len(outs)
        for i, o in enumerate(outs):
            if o.requires_grad:
                o.register_hook(self._out_grad_hook(call, i))

    def _out_grad_hook(self, call: _ModelCall, i: int):
        def hook(grad: Tensor) -> None:
            if self._want_out_grads and not self.engine.in_curvature_pass:
                call.out_grads[i] = grad.detach()

        return hook

    def _loss_hook(self, module, args, output) -> None:
        if torch.is_grad_enabled() and not self._closed and len(args) >= 2:
            self._loss_io = (args[0].detach(), args[1])

    # ------------------------------------------------------------------- step
    @contextmanager
    def step(self, step: int, loss: Tensor) -> Iterator[None]:
        """Track one training step; run ``loss.backward()`` inside the block.

        Args:
            step: The step index (strictly increasing across calls).
            loss: The batch loss tensor (a scalar ``[]``) about to be backpropagated.

        Yields:
            None; the instruments scheduled for ``step`` run when the block exits (those
            that need the update, like ``alpha``, after ``optimizer.step()``).

        Raises:
            ValueError: For a step index that does not increase, a model whose
                parameters changed, or gradients accumulated from earlier batches.
        """
        if self._closed:
            raise RuntimeError("the cockpit is closed")
        step = self._check_step(step)
        self._finish_pending_update()
        plans = {inst: inst.plan(step) for inst in self.instruments}
        active = {inst: plan for inst, plan in plans.items() if plan is not None}
        if not active:
            yield
            return
        quantities = frozenset().union(*(p.quantities for p in active.values()))
        directions: dict[str, dict[str, Tensor]] = {}
        for p in active.values():
            directions.update(p.directions)
        loss_value = float(loss.detach())
        finite = math.isfinite(loss_value)
        if quantities:
            stale = [
                k for k, p in self._trainable().items() if p.grad is not None and bool(p.grad.any())
            ]
            if stale:
                raise ValueError(
                    f"step {step}: gradients of {stale[:3]}{'...' if len(stale) > 3 else ''} are "
                    "non-zero before the backward pass. Gradient accumulation over micro-batches "
                    "is "
                    "not supported on tracked steps (per-sample statistics describe one batch): "
                    "call optimizer.zero_grad() before the forward pass."
                )
        self._want_out_grads = any(p.output_grad for p in active.values())
        self._sgd = None
        if self._want_out_grads and finite and GradDot() in quantities and not FORCE_JVP:
            # SGD's update is linear in ∇L, its momentum buffer and θ_t: project g_n
            # onto the last two now and read ⟨g_n, Δθ⟩ off them after the step
            self._sgd = sgd_update.arm(self.optimizer, self._trainable())
            if self._sgd is not None:
                quantities = quantities | {Projection(k) for k in self._sgd.directions}
                directions.update(self._sgd.directions)
        gather = (
            self.engine.gather(quantities, directions=directions, keep_factors=self._want_out_grads)
            if quantities and finite
            else nullcontext(None)
        )
        try:
            with gather as gathered:
                yield
        finally:
            self._want_out_grads = False
        if self._sgd is not None:
            sgd_update.after_backward(self._sgd, self._trainable())
        self._after_backward(step, loss_value, gathered, active)

    def _check_step(self, step: int) -> int:
        if isinstance(step, bool) or int(step) != step:
            raise TypeError(f"step must be an integer, got {step!r}")
        step = int(step)
        if self._last_step is None and self._resumed_after is not None:
            if step <= self._resumed_after:
                raise ValueError(
                    f"step {step}: the run directory {self.writer.run_dir} already holds steps "
                    f"up to {self._resumed_after} of an earlier run; continue it with a step "
                    f"after {self._resumed_after} (resuming), or pass a new logdir (or delete "
                    "that directory) to start a fresh run"
                )
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"step {step} does not increase (last tracked call was step {self._last_step}); "
                "pass a strictly increasing step index to cockpit.step()"
            )
        if self._signature() != self._param_signature:
            raise ValueError(
                "the model's parameters changed since the Cockpit was created (a layer was added, "
                "removed or reshaped); create a new Cockpit for the new model"
            )
        self._last_step = step
        return step

    def _after_backward(self, step, loss_value, gathered, active: dict[Instrument, Plan]) -> None:
        params = self._trainable()
        grads = {
            k: (p.grad.detach() if p.grad is not None else torch.zeros_like(p))
            for k, p in params.items()
        }
        finite = math.isfinite(loss_value) and all_finite(grads.values())
        n = gathered.batch_size if gathered is not None else self._batch_size()
        ctx = StepContext(
            step=step,
            batch_size=n,
            reduction=getattr(self.loss_fn, "reduction", "mean"),
            loss=loss_value,
            gathered=gathered,
            params={k: p.detach() for k, p in params.items()},
            grads=grads,
            initial_params=self._initial,
            optimizer=self.optimizer,
            engine=self.engine,
        )
        if not finite:
            self._nonfinite(step, active)
            return
        if any(p.individual_losses for p in active.values()):
            ctx.individual_losses = self._individual_losses(n)
        records: list[Record] = []
        for inst in active:
            records += inst.compute(ctx)
        self._emit(records)
        waiting = [inst for inst, plan in active.items() if plan.update]
        if waiting:
            call = self._call if any(active[i].output_grad for i in waiting) else None
            ctx._call = call  # type: ignore[attr-defined]
            self._awaiting = (ctx, waiting)
        if (not waiting or ctx._call is None) and gathered is not None:  # type: ignore[attr-defined]
            gathered.release()

    def _batch_size(self) -> int:
        """N from the model's last training input (dim 0 of its first tensor argument)."""
        call = self._call
        if call is not None:
            for a in (*call.args, *call.kwargs.values()):
                if isinstance(a, Tensor) and a.dim() > 0:
                    return int(a.shape[0])
        if self._loss_io is not None:
            return int(self._loss_io[0].shape[0])
        raise RuntimeError("no training forward pass of the model was seen before cockpit.step()")

    def _individual_losses(self, n: int) -> Tensor:
        if self._loss_io is None:
            raise RuntimeError(
                "the loss module was not called with gradients enabled before cockpit.step()"
            )
        output, target = self._loss_io
        return individual_losses(self.loss_fn, output, target, batch_size=n)

    def _nonfinite(self, step: int, active: dict[Instrument, Plan]) -> None:
        names = [inst.name for inst in active]
        msg = f"step {step}: the loss or the gradients are not finite; instruments {names} log NaN"
        if self.on_nonfinite == "raise":
            raise NonFiniteError(msg)
        new = [n for n in names if n not in self._warned_nonfinite]
        if new:
            self._warned_nonfinite.update(new)
            warnings.warn(msg + " (warned once per instrument)", RuntimeWarning, stacklevel=4)
        self._emit([Scalar(step, n, n, "all", float("nan")) for n in names])
        if self.writer is not None:
            self.writer.add_event("warning", msg, step=step)

    # ------------------------------------------------------- optimizer hooks
    def _optimizer_pre_hook(self, optimizer, args, kwargs) -> None:
        if self._awaiting is not None and not self._closed:
            params = self._trainable()
            self._snapshot = {k: p.detach().clone() for k, p in params.items()}
            if self._sgd is not None and not sgd_update.before_step(self._sgd, params):
                self._sgd = None

    def _optimizer_post_hook(self, optimizer, args, kwargs) -> None:
        if self._awaiting is None or self._snapshot is None:
            return
        ctx, waiting = self._awaiting
        before = self._snapshot
        self._awaiting = None
        plan, self._sgd = self._sgd, None
        try:
            params = self._trainable()
            delta = differences(params, before)
            total = math.sqrt(sum(squared_norms(delta).values()))
            call = getattr(ctx, "_call", None)
            if call is not None:
                ctx._directional = lambda u: self._directional_derivatives(
                    call, before, u, ctx.batch_size, ctx.gathered
                )
                if plan is not None and ctx.gathered is not None:
                    coeffs = sgd_update.matches(plan, before, delta)
                    if coeffs is not None:
                        ctx._update_directional = lambda: self._sgd_projections(
                            coeffs, ctx.gathered, ctx.batch_size
                        )
            update = Update(delta, total)
            records: list[Record] = []
            for inst in waiting:
                records += inst.on_update(ctx, update)
            self._emit(records)
        finally:
            self._snapshot = None
            ctx._directional = None
            ctx._update_directional = None
            ctx._call = None  # type: ignore[attr-defined]
            if ctx.gathered is not None:
                ctx.gathered.release()

    def _finish_pending_update(self) -> None:
        """A tracked step whose optimizer step never came: drop its update work."""
        if self._awaiting is not None and self._awaiting[0].gathered is not None:
            self._awaiting[0].gathered.release()
        self._awaiting = None
        self._snapshot = None
        self._sgd = None

    def _sgd_projections(
        self, coeffs: dict[str, sgd_update.Coefficients], gathered: Gathered, n: int
    ) -> Tensor:
        """``⟨g_n, Δθ⟩`` of an SGD step from projections gathered in its backward pass."""
        # ⟨g_n, ∇L⟩ = ⟨g_n, ḡ⟩ for a mean loss, N·⟨g_n, ḡ⟩ for a sum
        per_grad = n if getattr(self.loss_fn, "reduction", "mean") == "sum" else 1
        grad_dot = gathered[GradDot()]
        total: Tensor | None = None
        for name, c in coeffs.items():
            part = grad_dot[name] * (c.g * per_grad)
            if c.b != 0.0:
                part = part + gathered[Projection(sgd_update.PROJ_BUFFER)][name] * c.b
            if c.theta != 0.0:
                part = part + gathered[Projection(sgd_update.PROJ_PARAM)][name] * c.theta
            total = part if total is None else total + part
        self._update_sources["sgd"] += 1
        assert total is not None
        return total

    def _directional_derivatives(
        self,
        call: _ModelCall,
        theta: dict[str, Tensor],
        direction: dict[str, Tensor],
        n: int,
        gathered: Gathered | None = None,
    ) -> Tensor:
        """``⟨g_n, u⟩`` at θ_t.

        From the per-layer factors the engine kept from the backward pass (one matmul
        or convolution per layer); if they are unavailable or were changed in place
        since (a layer input that is a parameter the optimizer updated), by one
        forward-mode pass ``⟨∂L/∂f_n, J_θ f_n u⟩`` at the saved θ_t.
        """
        if gathered is not None and not FORCE_JVP:
            kept = gathered.project(direction)
            if kept is not None:
                self._update_sources["factors"] += 1
                return kept
        self._update_sources["jvp"] += 1
        if not any(g is not None for g in call.out_grads):
            raise RuntimeError("the model output's gradient was not captured on this step")
        tangents = {k: direction.get(k, torch.zeros_like(v)).to(v.dtype) for k, v in theta.items()}
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        state = torch.get_rng_state()
        cuda_state = call.cuda_rng and torch.cuda.get_rng_state_all()
        torch.set_rng_state(call.rng)
        if call.cuda_rng:
            torch.cuda.set_rng_state_all(call.cuda_rng)

        def f(p):
            return tuple(
                tensor_outputs(
                    functional_call(self.model, {**p, **buffers}, call.args, call.kwargs)
                )
            )

        try:
            # The fused CPU attention kernels have no forward-mode AD; the math one does.
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                _, tangent_out = jvp(f, (theta,), (tangents,))
        finally:
            torch.set_rng_state(state)
            if cuda_state:
                torch.cuda.set_rng_state_all(cuda_state)
        scale = n if getattr(self.loss_fn, "reduction", "mean") == "mean" else 1
        total = None
        for g, t in zip(call.out_grads, tangent_out, strict=False):
            if g is None:
                continue
            part = (g.to(t.dtype) * t).reshape(n, -1).sum(1)
            total = part if total is None else total + part
        return total * scale

    # ---------------------------------------------------------------- output
    def _emit(self, records: Iterable[Record]) -> None:
        scalars = []
        records = list(records)
        hists = [r for r in records if isinstance(r, Histogram) and self.writer is not None]
        # one device→host copy for all of them
        counts = dict(zip(map(id, hists), host_arrays([r.counts for r in hists]), strict=True))
        for r in records:
            if isinstance(r, Scalar):
                scalars.append(r)
                if r.param == "all":
                    key = r.instrument if r.metric == r.instrument else f"{r.instrument}.{r.metric}"
                    self._latest[key] = r.value
                    if not math.isfinite(r.value) and r.instrument not in self._warned_nonfinite:
                        self._warned_nonfinite.add(r.instrument)
                        if self.on_nonfinite == "raise":
                            raise NonFiniteError(f"step {r.step}: {r.instrument} is {r.value}")
            elif isinstance(r, Histogram) and self.writer is not None:
                self.writer.add_histogram(
                    r.step,
                    r.instrument,
                    r.param,
                    counts[id(r)],
                    [e.cpu().numpy() for e in r.edges],
                )
        if self.writer is not None and scalars:
            by_step: dict[int, list] = {}
            for r in scalars:
                by_step.setdefault(r.step, []).append(
                    (r.instrument, r.metric, r.param, float(r.value))
                )
            for s, rows in sorted(by_step.items()):
                self.writer.add_scalars(s, rows)

    def log(self, step: int, **metrics: float) -> None:
        """Log user metrics (e.g. ``accuracy=0.93``) beside the instruments.

        They are written as instrument ``"user"``, param ``"all"``.

        Args:
            step: The step index the metrics belong to (need not be tracked).
            **metrics: ``name=value`` pairs: floats or one-element tensors.
        """
        rows = []
        for k, v in metrics.items():
            value = float(v.detach()) if isinstance(v, Tensor) else float(v)
            rows.append(Scalar(int(step), "user", k, "all", value))
            self._latest[f"user.{k}"] = value
        self._emit(rows)

    def latest(self) -> dict[str, float]:
        """The last model-wide values: ``{instrument: value}`` (``"inst.metric"`` for extras).

        Returns:
            A copy: ``{"loss": 0.97, "grad_norm": 0.5, "user.accuracy": 0.5, ...}``.
        """
        return dict(self._latest)

    def close(self) -> None:
        """Remove all hooks and close the log (flushes everything). Idempotent.

        A value that needs the next step (alpha of the last tracked step) is not written.
        """
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self.engine.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Cockpit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None))) or (
        isinstance(v, (tuple, list)) and all(isinstance(x, (int, float, str, bool)) for x in v)
    )
