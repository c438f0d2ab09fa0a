"""Layer rules: bring one use of a layer into per-parameter :class:`~cockpit.factors.Factor` s.

A rule is a function ``rule(module, args, kwargs, grad_outputs, wanted) -> {name: Factor}``
registered for one or more module types with :func:`register_layer`. It receives the
module's positional and keyword inputs of one forward call, the gradients of the
batch loss w.r.t. the module's tensor outputs (already scaled so the factors describe
unscaled individual gradients; ``None`` for outputs that got no gradient) and the
local names of the parameters to cover (those with ``requires_grad``). A rule
registered with ``scales=True`` receives the unscaled gradients and a ``scale``
keyword instead, and applies it where it is cheapest (the Linear and convolution
rules scale the smaller of the layer input and the output gradient). Lookup walks
the class MRO, so subclasses of a supported layer are supported. Leaf modules with
parameters but no rule go through the ``torch.func`` fallback
(:mod:`cockpit.layers.functorch`).

Example — a rule for a custom elementwise scale layer:

    >>> import torch
    >>> from cockpit.factors import DenseFactor
    >>> class Scale(torch.nn.Module):
    ...     def __init__(self, d):
    ...         super().__init__()
    ...         self.weight = torch.nn.Parameter(torch.ones(d))
    ...     def forward(self, x):
    ...         return x * self.weight
    >>> @register_layer(Scale)
    ... def scale(module, args, kwargs, grad_outputs, wanted):
    ...     x, g = args[0], grad_outputs[0]
    ...     return {"weight": DenseFactor((x * g).reshape(x.shape[0], -1, x.shape[-1]).sum(1))}
    >>> find_rule(Scale(3)).name
    'scale'
    >>> unregister_layer(Scale)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from cockpit.factors import Factor

__all__ = [
    "LayerRule",
    "register_layer",
    "unregister_layer",
    "find_rule",
    "UnsupportedModuleError",
    "RuleFn",
    "scale_smaller",
]

RuleFn = Callable[
    [nn.Module, tuple, dict, tuple["Tensor | None", ...], frozenset], dict[str, Factor]
]


class UnsupportedModuleError(RuntimeError):
    """A module whose per-sample gradients cannot be computed (as configured).

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.quantities import BatchL2
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # training
        >>> with Engine(model) as engine:
        ...     loss = model(torch.randn(8, 3)).square().mean()
        ...     with engine.gather([BatchL2()], reduction="mean"):
        ...         loss.backward()
        Traceback (most recent call last):
        ...
        cockpit.layers.UnsupportedModuleError: per-sample gradients are undefined for:
          - 1: BatchNorm1d normalizes with batch statistics (train mode ...
        >>> Engine(torch.nn.PReLU(), fail_mode="error")  # strict: no torch.func fallback
        Traceback (most recent call last):
        ...
        cockpit.layers.UnsupportedModuleError: no layer rule for <model> (PReLU); ...
    """


@dataclass(frozen=True)
class LayerRule:
    """A registered rule.

    Attributes:
        name: The rule's name (the function name).
        fn: The rule function.
        check: Optional ``check(module)`` called at forward time; raises
            :class:`UnsupportedModuleError` when the module's configuration makes
            per-sample gradients undefined (e.g. BatchNorm in train mode).
        recurse: The rule covers the parameters of the module's children too (e.g.
            MultiheadAttention applies ``out_proj`` functionally); the children are then
            not hooked on their own.
        batch_size: ``batch_size(module, args, kwargs) -> N``; default: dim 0 of the
            first tensor input.
        scales: The rule takes the output gradients unscaled and a ``scale=`` keyword
            (see the module docstring); otherwise the engine scales them first.
        direct: The module's output is made by one autograd node that takes each of
            the module's parameters as a leaf and uses it nowhere else (a convolution):
            that node's gradients for them are the batch gradients of this use, which
            the engine reads off it for ⟨g_n, ḡ⟩.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> rule = find_rule(lin)
        >>> rule.name, rule.check, rule.recurse
        ('linear', None, False)
        >>> x, g = torch.randn(4, 3), torch.randn(4, 2)  # input [N, I], output gradient [N, O]
        >>> factors = rule.fn(lin, (x,), {}, (g,), frozenset({"weight", "bias"}))
        >>> {name: type(f).__name__ for name, f in factors.items()}
        {'weight': 'AffineFactor', 'bias': 'DenseFactor'}
        >>> factors["weight"].to_dense().shape  # [N, *P]
        torch.Size([4, 2, 3])
        >>> find_rule(torch.nn.MultiheadAttention(4, 2)).recurse  # it also covers out_proj
        True
    """

    name: str
    fn: RuleFn
    check: Callable[[nn.Module], None] | None = None
    recurse: bool = False
    batch_size: Callable[[nn.Module, tuple, dict], int] | None = None
    scales: bool = False
    direct: bool = False


_RULES: dict[type, LayerRule] = {}


def register_layer(
    *types: type[nn.Module],
    check: Callable[[nn.Module], None] | None = None,
    recurse: bool = False,
    batch_size: Callable[[nn.Module, tuple, dict], int] | None = None,
    overwrite: bool = False,
    scales: bool = False,
    direct: bool = False,
) -> Callable[[RuleFn], RuleFn]:
    """Register a rule function for module types (decorator).

    Args:
        *types: Module classes the rule handles (subclasses included).
        check: Optional forward-time configuration check.
        recurse: The rule also covers the children's parameters.
        batch_size: How to read N from the module's inputs (default: dim 0).
        overwrite: Replace an existing rule for the same type instead of raising.
        scales: The rule applies the gradient scale itself (``fn(..., scale=s)``).
        direct: The module's output comes from one autograd node that uses each
            parameter once, as a leaf (see :class:`LayerRule`).

    Example:
        >>> import torch
        >>> from cockpit import Engine
        >>> from cockpit.factors import DenseFactor
        >>> from cockpit.quantities import IndividualGradients
        >>> class Scale(torch.nn.Module):  # y = x ⊙ w on inputs [N, D]
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(d))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> @register_layer(Scale)
        ... def scale(module, args, kwargs, grad_outputs, wanted):
        ...     x, g = args[0], grad_outputs[0]  # input and output gradient, both [N, D]
        ...     return {"weight": DenseFactor(x * g)}  # g_n(w) = x_n ⊙ g_n, [N, D]
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), Scale(4)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
        >>> loss_fn = torch.nn.MSELoss()
        >>> with Engine(model, loss_fn, fail_mode="error") as engine:  # no fallback needed
        ...     hooked = engine.hooked_modules
        ...     loss = loss_fn(model(x), y)
        ...     with engine.gather([IndividualGradients()]) as result:
        ...         loss.backward()
        >>> hooked
        {'0': 'linear', '1': 'scale'}
        >>> def sample_loss(p, xn, yn):  # l_n, the loss of sample n alone
        ...     return loss_fn(torch.func.functional_call(model, p, (xn[None],)), yn[None])
        >>> per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(model.named_parameters()), x, y)  # {name: [N, *P]}
        >>> torch.allclose(result[IndividualGradients()]["1.weight"], ref["1.weight"])
        True
        >>> register_layer(Scale)(scale)  # one rule per type unless overwrite=True
        Traceback (most recent call last):
        ...
        ValueError: a layer rule for Scale exists (scale)
        >>> unregister_layer(Scale)
        >>> find_rule(Scale(4)) is None
        True
    """

    def decorator(fn: RuleFn) -> RuleFn:
        for t in types:
            if t in _RULES and not overwrite:
                raise ValueError(f"a layer rule for {t.__name__} exists ({_RULES[t].name})")
            _RULES[t] = LayerRule(fn.__name__, fn, check, recurse, batch_size, scales, direct)
        return fn

    return decorator


def unregister_layer(*types: type[nn.Module]) -> None:
    """Remove the rules registered for ``types``.

    Example:
        >>> import torch
        >>> class Tied(torch.nn.Linear):
        ...     pass
        >>> find_rule(Tied(2, 2)).name  # subclasses inherit the Linear rule
        'linear'
        >>> @register_layer(Tied)
        ... def tied(module, args, kwargs, grad_outputs, wanted):
        ...     raise NotImplementedError
        >>> find_rule(Tied(2, 2)).name
        'tied'
        >>> unregister_layer(Tied)  # back to the inherited rule
        >>> find_rule(Tied(2, 2)).name
        'linear'
    """
    for t in types:
        _RULES.pop(t, None)


def scale_smaller(x: Tensor, g: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(x, g)`` with ``scale`` applied to the smaller of the two (both unchanged at 1).

    A factor bilinear in a layer's input ``x`` and output gradient ``g`` (Linear, the
    convolutions) describes the scaled gradients whichever one carries the scale;
    a convolution's output gradient can be 16 times its input (3C3D's first layer).
    An input that is a leaf requiring grad (a parameter fed to a layer, an optimized
    input) is never copied: a kept factor must hold it itself, so that an in-place
    update after the pass (``optimizer.step()``) is seen by its version counter.

    Example:
        >>> import torch
        >>> x, g = torch.ones(2, 3), torch.ones(2, 5)
        >>> xs, gs = scale_smaller(x, g, 4.0)
        >>> xs[0, 0].item(), gs is g
        (4.0, True)
    """
    if scale == 1:
        return x, g
    if x.numel() <= g.numel() and not (x.is_leaf and x.requires_grad):
        return x * scale, g
    return x, g * scale


def find_rule(module: nn.Module) -> LayerRule | None:
    """Return the rule for ``module`` (walking its class MRO), or None.

    Example:
        >>> import torch
        >>> find_rule(torch.nn.Conv2d(1, 1, 3)).name, find_rule(torch.nn.BatchNorm1d(3)).name
        ('conv', 'batch_norm')
        >>> find_rule(torch.nn.PReLU()) is None  # the engine uses the torch.func fallback
        True
    """
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


# Built-in rules register themselves on import.
from cockpit.layers import attention, conv, embedding, linear, norm  # noqa: E402,F401
