"""Layer rules: bring one use of a layer into per-parameter :class:`~cockpit.factors.Factor` s.

A rule is a function ``rule(module, args, kwargs, grad_outputs, wanted) -> {name: Factor}``
registered for one or more module types with :func:`register_layer`. It receives the
module's positional and keyword inputs of one forward call, the gradients of the
batch loss w.r.t. the module's tensor outputs (already scaled so the factors describe
unscaled individual gradients; ``None`` for outputs that got no gradient) and the
local names of the parameters to cover (those with ``requires_grad``). Lookup walks
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
]

RuleFn = Callable[
    [nn.Module, tuple, dict, tuple["Tensor | None", ...], frozenset], dict[str, Factor]
]


class UnsupportedModuleError(RuntimeError):
    """A module whose per-sample gradients cannot be computed (as configured)."""


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
    """

    name: str
    fn: RuleFn
    check: Callable[[nn.Module], None] | None = None
    recurse: bool = False
    batch_size: Callable[[nn.Module, tuple, dict], int] | None = None


_RULES: dict[type, LayerRule] = {}


def register_layer(
    *types: type[nn.Module],
    check: Callable[[nn.Module], None] | None = None,
    recurse: bool = False,
    batch_size: Callable[[nn.Module, tuple, dict], int] | None = None,
    overwrite: bool = False,
) -> Callable[[RuleFn], RuleFn]:
    """Register a rule function for module types (decorator).

    Args:
        *types: Module classes the rule handles (subclasses included).
        check: Optional forward-time configuration check.
        recurse: The rule also covers the children's parameters.
        batch_size: How to read N from the module's inputs (default: dim 0).
        overwrite: Replace an existing rule for the same type instead of raising.
    """

    def decorator(fn: RuleFn) -> RuleFn:
        for t in types:
            if t in _RULES and not overwrite:
                raise ValueError(f"a layer rule for {t.__name__} exists ({_RULES[t].name})")
            _RULES[t] = LayerRule(fn.__name__, fn, check, recurse, batch_size)
        return fn

    return decorator


def unregister_layer(*types: type[nn.Module]) -> None:
    """Remove the rules registered for ``types``."""
    for t in types:
        _RULES.pop(t, None)


def find_rule(module: nn.Module) -> LayerRule | None:
    """Return the rule for ``module`` (walking its class MRO), or None."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


# Built-in rules register themselves on import.
from cockpit.layers import attention, conv, embedding, linear, norm  # noqa: E402,F401
