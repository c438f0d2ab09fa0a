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

Curvature (:class:`~cockpit.quantities.DiagGGN`, :class:`~cockpit.quantities.DiagHessian`)
is gathered in the same backward pass by nested vector-Jacobian products started from a
hook on the loss module's input (:mod:`cockpit.curvature`); :meth:`Engine.hessian_operator`
gives Hessian-vector products of the last recorded step (:mod:`cockpit.linops`).

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

    Curvature in the same pass, and Hessian-vector products afterwards:

    >>> from cockpit.quantities import DiagGGN
    >>> from cockpit.linops import lanczos
    >>> with Engine(model, loss_fn, seed=0) as engine:
    ...     loss = loss_fn(model(x), y)
    ...     with engine.gather([DiagGGN(), DiagGGN(mc_samples=1)]) as result:
    ...         loss.backward()
    ...     top = lanczos(engine.hessian_operator(), k=1)
    >>> result[DiagGGN()]["0.weight"].shape, result.exact[DiagGGN()]
    (torch.Size([2, 3]), True)
    >>> bool(top.eigenvalues[0] <= result.total(DiagGGN()) + 1e-6)  # λ_max ≤ trace (PSD)
    True
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from cockpit.curvature import ActivationRule, CurvaturePass, activation_rule
from cockpit.factors import MEAN_GRADIENT, Factor, combine
from cockpit.layers import LayerRule, UnsupportedModuleError, find_rule
from cockpit.layers.functorch import functorch_rule, tensor_outputs
from cockpit.linops import HessianOperator, twice_differentiable
from cockpit.quantities import (
    CURVATURE,
    Gathered,
    GradDot,
    Projection,
    Quantity,
    tensor_versions,
)

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
    order: int = 0  # position among the calls of this generation
    out_keys: list[tuple[int, int] | None] = field(default_factory=list)  # graph keys
    out_numel: int = 0
    # {local parameter name: index} of the parameters that the output's autograd node
    # consumes directly as leaves: that node's gradient for them is this use's batch
    # gradient, read in a hook on the node (see Engine._node_hook)
    leaf_edges: dict[str, int] | None = None


@dataclass
class _ActivationCall:
    """One call of an elementwise activation module (for the Hessian residual terms)."""

    module: nn.Module
    rule: ActivationRule
    value: Tensor  # detached output (rule.from_output) or input; autograd keeps it anyway
    order: int
    in_key: tuple[int, int] | None
    out_key: tuple[int, int]
    numel: int


@dataclass
class _LossCall:
    """The loss module's call: its input (with graph) and target."""

    input: Tensor
    target: Any


@dataclass
class _Generation:
    """Forward calls recorded since the last backward pass ended.

    Layer and activation calls are held weakly: the tensor hooks on their outputs keep
    them alive exactly as long as the autograd graph that can still deliver gradients.
    """

    module_uses: dict[nn.Module, int] = field(default_factory=lambda: defaultdict(int))
    param_uses: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    batch_sizes: dict[int, str] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)
    deferred: list[_Use] = field(default_factory=list)
    awaiting: list[_Use] = field(default_factory=list)  # processed when their node has run
    uses: list[weakref.ref] = field(default_factory=list)
    acts: list[weakref.ref] = field(default_factory=list)
    counter: int = 0
    loss: _LossCall | None = None
    loss_calls: int = 0


@dataclass
class _ForwardRecord:
    """The last forward pass of the whole model and its loss call (for Hessian products).

    Holds no autograd graph: inputs and targets are detached, outputs are graph keys.
    """

    args: tuple
    kwargs: dict
    rng: Tensor
    cuda_rng: list[Tensor] | None
    out_keys: list[tuple[int, int] | None] | None = None
    out_type: str = ""
    loss_args: tuple | None = None  # loss-call arguments after the input (detached)
    loss_kwargs: dict | None = None
    select: tuple[int, tuple] | None = None  # model output index, shape ops to replay
    select_error: str = ""
    loss_value: float | None = None


def _key(t: Tensor) -> tuple[int, int] | None:
    """Graph key of a tensor: its node's sequence number and its output number."""
    fn = t.grad_fn
    return None if fn is None else (fn._sequence_nr(), t.output_nr)


def _leaf_edges(node, params: Mapping[str, Tensor]) -> dict[str, int]:
    """``{name: i}`` for the ``params`` that ``node`` takes as leaves at input ``i``.

    A parameter reaches an autograd node as a leaf through an ``AccumulateGrad`` edge;
    the node's gradient on that edge is then the batch gradient of this use of it.
    """
    if node is None:
        return {}
    by_id = {id(p): k for k, p in params.items()}
    edges = {}
    for i, (fn, _) in enumerate(node.next_functions):
        var = getattr(fn, "variable", None) if fn is not None else None
        if var is not None and id(var) in by_id:
            edges[by_id[id(var)]] = i
    return edges


def _detach(x):
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_detach(v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


class _Bare(nn.Module):
    """Calls the wrapped module's ``forward`` without running the module's own hooks."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):  # noqa: D102
        return self.inner.forward(*args, **kwargs)


def _signed(d: int) -> int:
    return d - (1 << 64) if d >= 1 << 63 else d


def _shape_op(node, out_shape: tuple[int, ...]) -> tuple[tuple, tuple[int, ...]] | None:
    """A shape-only node as a replayable op and its input shape, or None."""
    name = type(node).__name__
    if name in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0") or (
        name.startswith("SqueezeBackward")
    ):
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        if sizes is None:
            return None
        return ("reshape", out_shape), tuple(int(v) for v in sizes)
    if name == "TransposeBackward0":
        d0, d1 = _signed(node._saved_dim0), _signed(node._saved_dim1)
        in_shape = list(out_shape)
        in_shape[d0], in_shape[d1] = in_shape[d1], in_shape[d0]
        return ("transpose", d0, d1), tuple(in_shape)
    if name == "TBackward0":
        return ("t",), tuple(reversed(out_shape))
    if name == "PermuteBackward0":
        dims = [_signed(d) % len(out_shape) for d in node._saved_dims]
        in_shape = [0] * len(out_shape)
        for j, d in enumerate(dims):
            in_shape[d] = out_shape[j]
        return ("permute", tuple(dims)), tuple(in_shape)
    if name == "UnsqueezeBackward0":
        d = _signed(node._saved_dim) % len(out_shape)
        return ("reshape", out_shape), out_shape[:d] + out_shape[d + 1 :]
    if name == "CloneBackward0":
        return ("clone",), out_shape
    return None


def _replay(x: Tensor, ops: tuple) -> Tensor:
    for op in ops:
        if op[0] == "reshape":
            x = x.reshape(op[1])
        elif op[0] == "transpose":
            x = x.transpose(op[1], op[2])
        elif op[0] == "t":
            x = x.t()
        elif op[0] == "permute":
            x = x.permute(op[1])
        else:  # clone
            x = x.clone()
    return x


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
        seed: Seed of the engine's own random generator, used for Monte-Carlo curvature
            (:class:`~cockpit.quantities.DiagGGN` with ``mc_samples > 0``) and
            Hutchinson probes; it never touches torch's global generator. None: a
            random seed. Reset it with :meth:`manual_seed`.

    The batch dimension must be dim 0 of every hooked module's input (except where a
    rule knows better, e.g. ``MultiheadAttention(batch_first=False)``).

    Curvature (:class:`~cockpit.quantities.DiagGGN`,
    :class:`~cockpit.quantities.DiagHessian`) and :meth:`hessian_operator` need
    ``loss_fn``: the engine also hooks the loss module (its input and target), the
    top-level model (its inputs and the random-number state, so dropout replays) and
    the elementwise activation modules (see :mod:`cockpit.curvature`). These hooks only
    keep references to tensors autograd keeps anyway (plus the detached inputs and
    targets of the last step) and cost nothing on untracked steps.

    Example:
        >>> import torch
        >>> from cockpit.quantities import BatchL2
        >>> _ = torch.manual_seed(0)
        >>> layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()  # D = 3·4 + 4 + 4·2 + 2 = 26 parameters
        >>> loss_fn = torch.nn.CrossEntropyLoss()  # reduction="mean"
        >>> x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
        >>> engine = Engine(model, loss_fn)
        >>> engine.hooked_modules
        {'0': 'linear', '2': 'linear'}
        >>> loss = loss_fn(model(x), y)
        >>> with engine.gather([BatchL2()]) as result:
        ...     loss.backward()  # the user's backward pass; p.grad is filled as usual
        >>> l2 = result[BatchL2()]  # {parameter name: ‖g_n‖² of that parameter, [N]}
        >>> hess = engine.hessian_operator()  # of the last recorded batch loss, [D, D]
        >>> v = torch.randn(26, dtype=torch.float64)  # [D], in model.named_parameters() order
        >>> hv = hess @ v  # [D]
        >>> engine.close()  # removes every hook
        >>> def sample_loss(p, xn, yn):  # l_n, the loss of sample n alone
        ...     return loss_fn(torch.func.functional_call(model, p, (xn[None],)), yn[None])
        >>> per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(model.named_parameters()), x, y)  # {name: [N, *P]}
        >>> all(torch.allclose(l2[k], ref[k].flatten(1).square().sum(1)) for k in ref)
        True
        >>> torch.allclose(model[0].weight.grad, ref["0.weight"].mean(0))  # plain p.grad
        True
        >>> def batch_loss(flat):  # L as a function of the flat parameter vector
        ...     return loss_fn(torch.func.functional_call(model, hess.unflatten(flat), (x,)), y)
        >>> flat = hess.flatten(dict(model.named_parameters())).detach()  # [D]
        >>> torch.allclose(hv, torch.autograd.functional.hvp(batch_loss, flat, v)[1])
        True

        Monte-Carlo curvature and Hutchinson probes draw from the engine's own generator, so
        training's random stream is never touched:

        >>> with Engine(model, loss_fn, seed=0) as engine:  # closed on leaving the block
        ...     first = torch.randn(2, generator=engine.generator())
        ...     engine.manual_seed(0)  # restart the engine's stream
        ...     again = torch.randn(2, generator=engine.generator())
        >>> torch.equal(first, again)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | None = None,
        *,
        fail_mode: str = "warn",
        seed: int | None = None,
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
        self._parameter_inputs: set[tuple[str, str]] = set()
        self._handles: list = []
        self._generation = _Generation()
        self._suspended = False
        self._in_curvature = False
        self._armed: _Armed | None = None
        self._reset_queued = False
        self._activations: dict[nn.Module, ActivationRule] = {}
        self._record: _ForwardRecord | None = None
        self._seed = int(torch.Generator().seed() if seed is None else seed)
        self._generators: dict[torch.device, torch.Generator] = {}
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
        for module in self.model.modules():
            rule = activation_rule(module)
            if rule is not None and module not in self._activations:
                self._activations[module] = rule
                self._handles.append(module.register_forward_hook(self._activation_hook))
        self._handles.append(
            self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(self._model_hook))
        if isinstance(self.loss_fn, nn.Module):
            self._handles.append(
                self.loss_fn.register_forward_hook(self._loss_hook, with_kwargs=True)
            )

    def close(self) -> None:
        """Remove all hooks. The engine cannot be used afterwards."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()
        self._activations.clear()
        self._armed = None
        self._record = None
        self._generation = _Generation()

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
        for a in (*args, *kwargs.values()):
            if isinstance(a, nn.Parameter) and a in self._names:
                self._warn_parameter_input(self._names[a], hooked, module)
        gen.module_uses[module] += 1
        for k in wanted:
            gen.param_uses[self._names[hooked.params[k]]] += 1
        use = _Use(module, hooked, args, kwargs, wanted, n, [None] * len(outs), len(needs))
        use.order = gen.counter
        gen.counter += 1
        use.out_keys = [_key(o) if o.requires_grad else None for o in outs]
        use.out_numel = sum(outs[i].numel() for i in needs)
        gen.uses.append(weakref.ref(use))
        if len(needs) > 1:
            gen.deferred.append(use)
        for i in needs:
            outs[i].register_hook(self._grad_hook(use, i))
        if len(needs) == 1 and hooked.rule.direct:
            node = outs[needs[0]].grad_fn
            edges = _leaf_edges(node, {k: hooked.params[k] for k in wanted})
            if edges:
                use.leaf_edges = edges
                node.register_hook(self._node_hook(use))

    def _warn_parameter_input(self, name: str, hooked: _Hooked, module: nn.Module) -> None:
        """Once per (parameter, module): a parameter fed to a hooked module directly."""
        key = (name, hooked.name)
        if key in self._parameter_inputs:
            return
        self._parameter_inputs.add(key)
        warnings.warn(
            f"parameter {name!r} is an input of module {hooked.name!r} "
            f"({type(module).__name__}). The engine covers a parameter's uses inside its own "
            f"modules only, so the per-sample quantities of {name!r} miss this use. Feed "
            f"{hooked.name!r} the output of a module that owns {name!r} instead of the "
            "parameter itself.",
            UserWarning,
            stacklevel=3,
        )

    def _activation_hook(self, module: nn.Module, args: tuple, output) -> None:
        if self._suspended or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or not output.requires_grad or output.grad_fn is None:
            return
        z = args[0] if args else None
        if not isinstance(z, Tensor) or z.shape != output.shape:
            return
        rule = self._activations[module]
        gen = self._generation
        call = _ActivationCall(
            module,
            rule,
            (output if rule.from_output else z).detach(),
            gen.counter,
            _key(z) if z.requires_grad else None,
            _key(output),  # type: ignore[arg-type]
            z.numel(),
        )
        gen.counter += 1
        gen.acts.append(weakref.ref(call))
        output.register_hook(self._activation_grad_hook(call))

    def _activation_grad_hook(self, call: _ActivationCall):
        def hook(grad: Tensor) -> None:
            if self._in_curvature:
                return
            armed = self._armed
            if armed is None or armed.finished:
                self._queue_reset()
                return
            armed.start()
            if armed.curvature is not None:
                armed.curvature.on_activation_grad(call, grad)

        return hook

    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._suspended or not torch.is_grad_enabled():
            return
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.get_rng_state_all()
        self._record = _ForwardRecord(_detach(args), _detach(kwargs), torch.get_rng_state(), cuda)

    def _model_hook(self, module: nn.Module, args: tuple, output) -> None:
        rec = self._record
        if rec is None or self._suspended or not torch.is_grad_enabled():
            return
        outs = tensor_outputs(output)
        rec.out_keys = [_key(o) for o in outs]
        rec.out_type = type(output).__name__
        # The curvature pass starts from whichever output feeds the loss. Hooking the
        # outputs here, before hooks that others register on them later, means such hooks
        # see the loss gradient last (after the nested curvature passes, during which they
        # fire too, with curvature columns).
        for o, key in zip(outs, rec.out_keys, strict=True):
            if key is not None and o.requires_grad:
                o.register_hook(self._output_grad_hook(key))

    def _loss_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._suspended or not torch.is_grad_enabled():
            return
        kwargs = dict(kwargs)
        if args:
            x, rest = args[0], tuple(args[1:])
        else:
            x, rest = kwargs.pop("input", None), ()
        if not isinstance(x, Tensor):
            return
        target = rest[0] if rest else kwargs.get("target")
        gen = self._generation
        gen.loss = _LossCall(x, _detach(target))
        gen.loss_calls += 1
        rec = self._record
        if x.requires_grad and (rec is None or _key(x) not in (rec.out_keys or ())):
            x.register_hook(self._output_grad_hook(None))
        if rec is not None:
            rec.loss_args, rec.loss_kwargs = _detach(rest), _detach(kwargs)
            rec.select, rec.select_error = self._select(rec, x)
            if isinstance(output, Tensor) and output.numel() == 1:
                rec.loss_value = float(output.detach())

    @staticmethod
    def _select(rec: _ForwardRecord, x: Tensor) -> tuple[Any, str]:
        """Which model output the loss input is (up to reshapes/transposes), or why none is."""
        keys = rec.out_keys
        if keys is None:
            return None, "no forward pass of the whole model was recorded before the loss call"
        ops: list[tuple] = []
        node, nr, shape = x.grad_fn, x.output_nr, tuple(x.shape)
        while node is not None:
            key = (node._sequence_nr(), nr)
            if key in keys:
                return (keys.index(key), tuple(reversed(ops))), ""
            step = _shape_op(node, shape)
            if step is None:
                break
            op, shape = step
            ops.append(op)
            node, nr = node.next_functions[0]
        what = (
            "a tensor"
            if rec.out_type in ("Tensor", "Parameter")
            else f"a {rec.out_type} holding {len(keys)} tensor(s)"
        )
        return None, (
            f"the loss module's input is not the model's output: the model returned {what}, "
            "and the loss input is neither one of those tensors nor a reshape, transpose or "
            "permutation of one. Hessian-vector products re-evaluate loss_fn(model(inputs)), so "
            "compute the loss directly on a tensor the model returns (or a reshape of it)"
        )

    def _output_grad_hook(self, key: tuple[int, int] | None):
        """Tensor hook on a model output (``key``) or on a loss input that is none (None)."""

        def hook(grad: Tensor) -> None:
            if self._in_curvature:
                return
            armed = self._armed
            if armed is None or armed.finished:
                self._queue_reset()
                return
            armed.start()
            curvature = armed.curvature
            if curvature is not None and (key is None or key == curvature.loss_key):
                curvature.on_loss_grad()

        return hook

    def _grad_hook(self, use: _Use, index: int):
        def hook(grad: Tensor) -> None:
            if self._in_curvature:  # a nested curvature backward pass, not the user's
                return
            armed = self._armed
            if armed is None or armed.finished:
                self._queue_reset()
                return
            armed.start()
            use.grads[index] = grad
            use.waiting -= 1
            if use.waiting == 0 and not use.done:
                if use.leaf_edges and armed.wants_batch_grads:
                    self._generation.awaiting.append(use)  # the node's hook processes it
                else:
                    self._process(use)

        return hook

    def _node_hook(self, use: _Use):
        """Hook on the autograd node that made a use's output, run after that node.

        Its gradients for the parameters it consumes as leaves are the batch gradient
        of this use: ⟨g_n, ḡ⟩ then needs no pass over all samples' gradients at once
        (see :data:`cockpit.factors.MEAN_GRADIENT`), so per-sample gradients are built
        in chunks of samples, the shape their kernels run fastest in.
        """

        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            # not yet received (another pass) or already processed (no ḡ wanted)
            if self._in_curvature or use.waiting or use.done:
                return
            armed = self._armed
            if armed is None or armed.finished:
                return
            assert use.leaf_edges is not None
            edges = use.leaf_edges.items()
            self._process(use, {k: grad_inputs[i] for k, i in edges if grad_inputs[i] is not None})

        return hook

    def _queue_reset(self) -> None:
        if not self._reset_queued:
            self._reset_queued = True
            Variable._execution_engine.queue_callback(self._new_generation)

    def _new_generation(self) -> None:
        self._reset_queued = False
        self._generation = _Generation()

    # ------------------------------------------------------------ processing
    def _process(self, use: _Use, batch_grads: Mapping[str, Tensor] | None = None) -> None:
        """Reduce one use's factors; ``batch_grads`` are its node's parameter gradients."""
        armed = self._armed
        assert armed is not None
        use.done = True
        if not armed.requests and not armed.keep_factors:  # curvature only
            return
        scale, rule = armed.scale, use.hooked.rule
        self._suspended = True
        try:
            if rule.scales:  # the rule scales the smaller of its input and gradient
                factors = rule.fn(
                    use.module, use.args, use.kwargs, use.grads, use.wanted, scale=scale
                )
            else:
                grads = tuple(g if g is None or scale == 1 else g * scale for g in use.grads)
                factors = rule.fn(use.module, use.args, use.kwargs, grads, use.wanted)
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
                # a node's gradient is ḡ only when this is the parameter's one use
                single = batch_grads and self._generation.param_uses[name] == 1
                self._finalize(name, batch_grads.get(local) if single else None)

    def _finalize(self, name: str, batch_grad: Tensor | None = None) -> None:
        armed = self._armed
        assert armed is not None
        factors = armed.pending.pop(name)
        factor: Factor = combine(factors)
        param = self._param_by_name(name)
        directions = {k: v.get(name) for k, v in armed.directions.items()}
        if batch_grad is not None:  # ḡ = (1/N) Σ_n g_n with g_n scaled like the factors
            directions[MEAN_GRADIENT] = batch_grad.detach() * (armed.scale / armed.n)
        with torch.no_grad():
            if armed.keep_factors:  # slimmed, or the per-sample gradients if built anyway
                values, kept = factor.reduce_and_keep(armed.requests, param.detach(), directions)
                armed.result.kept[name] = (kept, param.detach(), tensor_versions(kept))
            else:
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
            for use in self._generation.awaiting:  # their node did not run (pruned graph)
                if not use.done:
                    self._process(use)
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
        keep_factors: bool = False,
    ) -> Iterator[Gathered]:
        """Arm the engine for the next backward pass inside the ``with`` block.

        Args:
            quantities: Quantity keys to gather (duplicates merge).
            directions: For :class:`~cockpit.quantities.Projection` requests,
                ``{key: {parameter name: tensor shaped like the parameter}}``.
            reduction: ``"mean"`` or ``"sum"``; read from ``loss_fn.reduction`` when the
                engine has a loss module.
            keep_factors: Keep each parameter's per-sample factor (layer inputs and
                output gradients, not per-sample gradients) in the result, so
                :meth:`~cockpit.quantities.Gathered.project` can project on a direction
                chosen after the pass; ``Gathered.release()`` frees them.

        Yields:
            A :class:`~cockpit.quantities.Gathered` filled when the block exits.

        Curvature keys (:class:`~cockpit.quantities.DiagGGN`,
        :class:`~cockpit.quantities.DiagHessian`) are computed in the same backward pass
        (see :mod:`cockpit.curvature`); a :class:`~cockpit.quantities.DiagHessian` that
        is not provably exact is replaced by a Hutchinson estimate when the block exits
        (with a warning), and ``Gathered.exact`` says which one it is.

        Raises:
            UnsupportedModuleError: A module used in the forward pass cannot give
                per-sample gradients as configured (e.g. BatchNorm in train mode).
            RuntimeError: No backward pass ran inside the block.
            ValueError: Curvature requested without a loss module, or with a loss whose
                reduction or input the engine cannot use.

        Example:
            >>> import torch
            >>> from cockpit.quantities import IndividualGradients, Projection
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Linear(3, 2).double()
            >>> x = torch.randn(4, 3, dtype=torch.float64)  # [N, I]
            >>> u = {"weight": torch.ones(2, 3, dtype=torch.float64)}  # none for the bias: 0
            >>> wanted = [Projection("u"), IndividualGradients()]
            >>> options = dict(directions={"u": u}, reduction="sum", keep_factors=True)
            >>> with Engine(model) as engine:  # no loss module: gather names the reduction
            ...     loss = model(x).square().sum()
            ...     with engine.gather(wanted, **options) as result:
            ...         loss.backward()
            >>> g = result[IndividualGradients()]["weight"]  # [N, *P]
            >>> proj = result[Projection("u")]  # {name: ⟨g_n, u⟩, [N]}
            >>> torch.allclose(proj["weight"], g.sum((1, 2))), proj["bias"].tolist()
            (True, [0.0, 0.0, 0.0, 0.0])
            >>> torch.allclose(result.project(u), proj["weight"])  # kept factors: projected later
            True
        """
        requests = tuple(dict.fromkeys(quantities))
        curvature = tuple(q for q in requests if isinstance(q, CURVATURE))
        requests = tuple(q for q in requests if not isinstance(q, CURVATURE))
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
        armed = _Armed(self, requests, directions, n, scale, result, keep_factors=keep_factors)
        if curvature:
            armed.curvature = CurvaturePass(curvature, self, n)
        self._armed = armed
        try:
            yield result
            if not armed.started:
                raise RuntimeError(
                    "no backward pass reached the model's parameters inside gather(); call "
                    "loss.backward() inside the with-block"
                )
            if not armed.finished:  # e.g. autograd.grad without reaching all leaves
                self._end_backward()
            if armed.curvature is not None:
                armed.curvature.finish(result)
        finally:
            armed.curvature = None
            self._armed = None

    # ------------------------------------------------------------- curvature
    @property
    def in_curvature_pass(self) -> bool:
        """True while the engine runs a nested curvature backward pass.

        Tensor hooks that other code registered on the model's intermediate tensors also
        fire during these nested passes (with batched gradients of the curvature
        columns, not the loss gradient); such hooks should return early while this is
        True.
        """
        return self._in_curvature

    def manual_seed(self, seed: int) -> None:
        """Reseed the engine's generators (Monte-Carlo curvature, Hutchinson probes)."""
        self._seed = int(seed)
        for gen in self._generators.values():
            gen.manual_seed(self._seed)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The engine's random generator on ``device`` (seeded with the engine's seed)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    def hessian_operator(self) -> HessianOperator:
        """The Hessian of the last recorded batch loss w.r.t. the trainable parameters.

        The operator re-evaluates ``loss_fn(model(inputs), target)`` functionally with the
        inputs, target and random-number state of the last forward pass with gradients
        (dropout masks replay; buffers are copies, so BatchNorm statistics do not move),
        builds its own gradient graph on its first product and frees it when dropped.
        The re-evaluation calls ``model.forward`` and ``loss_fn.forward`` directly, so
        hooks registered on the model itself and on the loss module (e.g. a Cockpit's)
        do not see it; hooks on submodules do.
        It needs no ``backward(create_graph=True)`` and leaves ``p.grad`` alone. Valid
        until the parameters change (e.g. ``optimizer.step()``); flat vectors follow
        ``model.named_parameters()`` order (shared tensors once).

        Raises:
            RuntimeError: No forward pass with a loss call was recorded.
            ValueError: The loss input is not (a reshape of) a tensor the model returned.
        """
        rec = self._record
        if not self._handles:
            raise RuntimeError("the engine is closed")
        if rec is None or rec.loss_args is None:
            raise RuntimeError(
                "no forward pass of the model followed by a call of the engine's loss_fn was "
                "recorded (with gradients enabled); run both before hessian_operator()"
            )
        if rec.select is None:
            raise ValueError(rec.select_error)
        index, ops = rec.select
        params = {name: p for p, name in self._names.items() if p.requires_grad}
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        bare, loss_fn = _Bare(self.model), self.loss_fn
        assert loss_fn is not None
        loss_args, loss_kwargs = rec.loss_args, rec.loss_kwargs or {}

        def loss(p: dict[str, Tensor]) -> Tensor:
            devices = [] if rec.cuda_rng is None else list(range(len(rec.cuda_rng)))
            with self._suspend(), torch.random.fork_rng(devices=devices), twice_differentiable():
                torch.set_rng_state(rec.rng)
                if rec.cuda_rng is not None:
                    torch.cuda.set_rng_state_all(rec.cuda_rng)
                state = {f"inner.{k}": v for k, v in {**buffers, **p}.items()}
                out = torch.func.functional_call(bare, state, rec.args, rec.kwargs)
                x = _replay(tensor_outputs(out)[index], ops)
                value = loss_fn.forward(x, *loss_args, **loss_kwargs)
            if rec.loss_value is not None and math.isfinite(rec.loss_value):
                got = float(value.detach())
                if not math.isclose(got, rec.loss_value, rel_tol=1e-4, abs_tol=1e-6):
                    warnings.warn(
                        f"the re-evaluated loss {got:.6g} differs from the recorded "
                        f"{rec.loss_value:.6g}: the model is not deterministic given its "
                        "inputs and random state (or they changed in place); Hessian products "
                        "describe the re-evaluated loss",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            return value

        return HessianOperator(loss, params)

    @contextmanager
    def _suspend(self) -> Iterator[None]:
        old = self._suspended
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = old

    def _live_uses(self) -> list[_Use]:
        return [u for r in self._generation.uses if (u := r()) is not None]

    def _live_activations(self) -> list[_ActivationCall]:
        return [a for r in self._generation.acts if (a := r()) is not None]

    def _param_bits(self) -> dict[int, int]:
        return {id(p): 1 << i for i, p in enumerate(self._names)}

    def _params_by_name(self) -> dict[str, nn.Parameter]:
        return {n: p for p, n in self._names.items()}

    def _reduction(self, reduction: str | None) -> str:
        source = ""
        if reduction is None:
            source = f" (from {type(self.loss_fn).__name__}.reduction)"
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
                f"{source}"
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
    curvature: CurvaturePass | None = None
    keep_factors: bool = False

    @cached_property
    def wants_batch_grads(self) -> bool:
        """Whether a request uses ḡ: ⟨g_n, ḡ⟩ (the gradient tests)."""
        return any(isinstance(q, GradDot) for q in self.requests)

    def start(self) -> None:
        if not self.started:
            self.started = True
            Variable._execution_engine.queue_callback(self.engine._end_backward)
