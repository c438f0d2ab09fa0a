"""The backprop engine: per-sample statistics gathered during the user's backward pass.

:class:`Engine` hooks every module that owns trainable parameters. Forward hooks keep
references to the inputs of each call (no copies) and register a tensor hook on the
call's output; when the engine is *armed* for a backward pass, that hook receives the
output gradient, runs the layer rule (:mod:`cockpit.layers`) and reduces the resulting
factors to the requested quantities right away, so per-sample gradients never exist
for the whole model at once. When it is idle the hooks do nothing, so untracked steps
cost what a plain step costs (plus a few microseconds of Python per layer).

No state is stored on modules or parameters, the hooks never change gradients
(``p.grad`` is exactly what a plain backward gives), and all handles are removed by
:meth:`Engine.close` (or on leaving ``with Engine(...)``).

Example:
    >>> import torch
    >>> from cockpit.engine import Engine
    >>> from cockpit.quantities import BatchL2
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> loss_fn = torch.nn.MSELoss()
    >>> x, y = torch.randn(4, 3), torch.randn(4, 2)
    >>> with Engine(model, loss_fn) as engine:
    ...     loss = loss_fn(model(x), y)
    ...     with engine.gather([BatchL2()]) as result:
    ...         loss.backward()
    >>> result[BatchL2()]["0.weight"].shape
    torch.Size([4])
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from cockpit.factors import Factor, combine
from cockpit.layers import LayerRule, UnsupportedModuleError, find_rule
from cockpit.layers.functorch import functorch_rule, tensor_outputs
from cockpit.quantities import Gathered, Projection, Quantity

__all__ = ["Engine", "UnsupportedModuleError"]

_FALLBACK = LayerRule("functorch", functorch_rule)
_FAIL_MODES = ("warn", "error", "silent")


@dataclass
class _Hooked:
    """A hooked module: its name, rule and the parameters the rule covers."""

    name: str
    rule: LayerRule
    params: dict[str, nn.Parameter]


@dataclass
class _Use:
    """One forward call of a hooked module, waiting for its output gradients."""

    module: nn.Module
    hooked: _Hooked
    args: tuple
    kwargs: dict
    wanted: frozenset
    n: int
    grads: list[Tensor | None]
    waiting: int  # output gradients still expected before immediate processing
    done: bool = False


@dataclass
class _Generation:
    """Forward calls recorded since the last backward pass ended."""

    module_uses: dict[nn.Module, int] = field(default_factory=lambda: defaultdict(int))
    param_uses: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    batch_sizes: dict[int, str] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)
    deferred: list[_Use] = field(default_factory=list)


class Engine:
    """Gathers per-sample gradient quantities during ``loss.backward()``.

    Args:
        model: Any ``nn.Module``. Every module that owns trainable parameters is hooked;
            modules with a layer rule use it, others the ``torch.func`` fallback.
        loss_fn: The loss module called in the training loop (``reduction`` must be
            ``"mean"`` or ``"sum"``). Optional: without it, pass ``reduction`` to
            :meth:`gather`.
        fail_mode: What to do about modules without a rule: ``"warn"`` (use the
            fallback, warn once naming the module), ``"silent"``, or ``"error"``
            (strict: raise :class:`UnsupportedModuleError`).

    The batch dimension must be dim 0 of every hooked module's input (except where a
    rule knows better, e.g. ``MultiheadAttention(batch_first=False)``).
    """

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module | None = None, *, fail_mode: str = "warn"
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if fail_mode not in _FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {_FAIL_MODES}, got {fail_mode!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.fail_mode = fail_mode
        self._names: dict[nn.Parameter, str] = {}
        for name, p in model.named_parameters():
            self._names.setdefault(p, name)
        self._hooked: dict[nn.Module, _Hooked] = {}
        self._handles: list = []
        self._generation = _Generation()
        self._suspended = False
        self._armed: _Armed | None = None
        self._reset_queued = False
        self._attach()

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        covered: set[nn.Module] = set()
        fallback_users = []
        for mod_name, module in self.model.named_modules():
            if module in covered:
                continue
            rule = find_rule(module)
            if rule is not None and rule.recurse:
                params = dict(module.named_parameters())
                covered.update(m for m in module.modules() if m is not module)
            else:
                params = dict(module.named_parameters(recurse=False))
            if not params:
                continue
            if rule is None:
                fallback_users.append(f"{mod_name or '<model>'} ({type(module).__name__})")
                rule = _FALLBACK
            self._hooked[module] = _Hooked(mod_name or "<model>", rule, params)
        if fallback_users:
            msg = (
                "no layer rule for " + ", ".join(fallback_users) + "; per-sample gradients of "
                "their parameters use the generic torch.func fallback (exact, but it re-runs the "
                "module per sample). Register a rule with cockpit.register_layer for speed."
            )
            if self.fail_mode == "error":
                raise UnsupportedModuleError(msg + " (fail_mode='error')")
            if self.fail_mode == "warn":
                warnings.warn(msg, stacklevel=3)
        for module in self._hooked:
            self._handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True))

    def close(self) -> None:
        """Remove all hooks. The engine cannot be used afterwards."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()
        self._armed = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def hooked_modules(self) -> dict[str, str]:
        """``{module name: rule name}`` of the hooked modules."""
        return {h.name: h.rule.name for h in self._hooked.values()}

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._suspended or not torch.is_grad_enabled():
            return
        hooked = self._hooked.get(module)
        if hooked is None:
            return
        wanted = frozenset(k for k, p in hooked.params.items() if p.requires_grad)
        if not wanted:
            return
        outs = tensor_outputs(output)
        needs = [i for i, o in enumerate(outs) if o.requires_grad]
        if not needs:
            return
        gen = self._generation
        if hooked.rule.check is not None:
            try:
                hooked.rule.check(module)
            except UnsupportedModuleError as err:
                gen.invalid.setdefault(hooked.name, str(err))
        try:
            if hooked.rule.batch_size is not None:
                n = hooked.rule.batch_size(module, args, kwargs)
            else:
                n = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)).shape[0]
        except (StopIteration, IndexError, ValueError) as err:
            gen.invalid.setdefault(hooked.name, f"cannot read the batch size of its input: {err}")
            n = -1
        gen.batch_sizes.setdefault(n, hooked.name)
        gen.module_uses[module] += 1
        for k in wanted:
            gen.param_uses[self._names[hooked.params[k]]] += 1
        use = _Use(module, hooked, args, kwargs, wanted, n, [None] * len(outs), len(needs))
        if len(needs) > 1:
            gen.deferred.append(use)
        for i in needs:
            outs[i].register_hook(self._grad_hook(use, i))

    def _grad_hook(self, use: _Use, index: int):
        def hook(grad: Tensor) -> None:
            armed = self._armed
            if armed is None or armed.finished:
                self._queue_reset()
                return
            armed.start()
            use.grads[index] = grad
            use.waiting -= 1
            if use.waiting == 0 and not use.done:
                self._process(use)

        return hook

    def _queue_reset(self) -> None:
        if not self._reset_queued:
            self._reset_queued = True
            Variable._execution_engine.queue_callback(self._new_generation)

    def _new_generation(self) -> None:
        self._reset_queued = False
        self._generation = _Generation()

    # ------------------------------------------------------------ processing
    def _process(self, use: _Use) -> None:
        armed = self._armed
        assert armed is not None
        use.done = True
        scale = armed.scale
        grads = tuple(g if g is None or scale == 1 else g * scale for g in use.grads)
        self._suspended = True
        try:
            factors = use.hooked.rule.fn(use.module, use.args, use.kwargs, grads, use.wanted)
        finally:
            self._suspended = False
        for local, factor in factors.items():
            name = self._names[use.hooked.params[local]]
            if factor.n != armed.n:
                raise ValueError(
                    f"module {use.hooked.name!r} ({type(use.module).__name__}): per-sample "
                    f"gradients of {name!r} have batch size {factor.n}, expected {armed.n}. The "
                    "batch dimension must come first in every layer's input."
                )
            pending = armed.pending[name]
            pending.append(factor)
            if len(pending) >= self._generation.param_uses.get(name, 1):
                self._finalize(name)

    def _finalize(self, name: str) -> None:
        armed = self._armed
        assert armed is not None
        factors = armed.pending.pop(name)
        factor: Factor = combine(factors)
        param = self._param_by_name(name)
        directions = {k: v.get(name) for k, v in armed.directions.items()}
        with torch.no_grad():
            values = factor.reduce(armed.requests, param.detach(), directions)
        for q, v in values.items():
            armed.result.per_param.setdefault(q, {})[name] = v

    def _param_by_name(self, name: str) -> nn.Parameter:
        if not hasattr(self, "_by_name"):
            self._by_name = {n: p for p, n in self._names.items()}
        return self._by_name[name]

    def _end_backward(self) -> None:
        armed = self._armed
        if armed is None:
            return
        try:
            for use in self._generation.deferred:
                if not use.done and any(g is not None for g in use.grads):
                    self._process(use)
            for name in list(armed.pending):
                self._finalize(name)
        finally:
            armed.finished = True
            self._new_generation()

    # ---------------------------------------------------------------- public
    @contextmanager
    def gather(
        self,
        quantities: Iterable[Quantity],
        *,
        directions: Mapping[str, Mapping[str, Tensor]] | None = None,
        reduction: str | None = None,
    ) -> Iterator[Gathered]:
        """Arm the engine for the next backward pass inside the ``with`` block.

        Args:
            quantities: Quantity keys to gather (duplicates merge).
            directions: For :class:`~cockpit.quantities.Projection` requests,
                ``{key: {parameter name: tensor shaped like the parameter}}``.
            reduction: ``"mean"`` or ``"sum"``; read from ``loss_fn.reduction`` when the
                engine has a loss module.

        Yields:
            A :class:`~cockpit.quantities.Gathered` filled when the block exits.

        Raises:
            UnsupportedModuleError: A module used in the forward pass cannot give
                per-sample gradients as configured (e.g. BatchNorm in train mode).
            RuntimeError: No backward pass ran inside the block.
        """
        requests = tuple(dict.fromkeys(quantities))
        reduction = self._reduction(reduction)
        directions = {k: dict(v) for k, v in (directions or {}).items()}
        for q in requests:
            if isinstance(q, Projection) and q.key not in directions:
                raise ValueError(f"{q!r} needs directions[{q.key!r}]")
        if not self._handles:
            raise RuntimeError("the engine is closed")
        if self._armed is not None and not self._armed.finished:
            raise RuntimeError("gather() is already active")
        gen = self._generation
        if gen.invalid:
            lines = "\n".join(f"  - {name}: {msg}" for name, msg in gen.invalid.items())
            raise UnsupportedModuleError("per-sample gradients are undefined for:\n" + lines)
        sizes = {n: m for n, m in gen.batch_sizes.items()}
        if not sizes:
            raise RuntimeError(
                "no forward pass with gradients was recorded since the last backward pass: run "
                "the model's forward pass (with the engine attached) before gather()"
            )
        if len(sizes) > 1:
            detail = ", ".join(f"{n} (first seen in {m!r})" for n, m in sizes.items())
            raise ValueError(
                f"inconsistent batch sizes across layers: {detail}. The batch dimension must "
                "be dim 0 of every layer's input."
            )
        (n,) = sizes
        result = Gathered(batch_size=n, reduction=reduction)
        scale = float(n) if reduction == "mean" else 1.0
        self._armed = _Armed(self, requests, directions, n, scale, result)
        try:
            yield result
            if not self._armed.started:
                raise RuntimeError(
                    "no backward pass reached the model's parameters inside gather(); call "
                    "loss.backward() inside the with-block"
                )
            if not self._armed.finished:  # e.g. autograd.grad without reaching all leaves
                self._end_backward()
        finally:
            self._armed = None

    def _reduction(self, reduction: str | None) -> str:
        if reduction is None:
            if self.loss_fn is None:
                raise ValueError("pass reduction='mean' or 'sum' (the engine has no loss_fn)")
            reduction = getattr(self.loss_fn, "reduction", None)
            if reduction is None:
                raise ValueError(
                    f"loss module {type(self.loss_fn).__name__} has no 'reduction' attribute; "
                    "pass reduction='mean' or 'sum' to gather()"
                )
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"reduction must be 'mean' or 'sum' (a scalar batch loss), got {reduction!r}"
            )
        return reduction


@dataclass
class _Armed:
    """State of one armed backward pass."""

    engine: Engine
    requests: tuple[Quantity, ...]
    directions: dict[str, dict[str, Tensor]]
    n: int
    scale: float
    result: Gathered
    pending: dict[str, list[Factor]] = field(default_factory=lambda: defaultdict(list))
    started: bool = False
    finished: bool = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            Variable._execution_engine.queue_callback(self.engine._end_backward)
