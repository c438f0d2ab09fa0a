"""Per-sample projections onto an SGD step, gathered before the step is taken.

Alpha needs ``⟨g_n, Δθ⟩`` at θ_t for the step's own update ``Δθ = θ_{t+1} − θ_t``,
known only after ``optimizer.step()``; in general that costs a projection of every
layer's kept factors (a convolution per conv layer) after the step. For
``torch.optim.SGD`` the update is linear in three tensors that exist while the
backward pass runs: the gradient ``∇L``, the momentum buffer ``b`` and θ_t itself,

    Δθ = c_g ∇L + c_b b + c_θ θ_t,

with coefficients from the parameter group (``lr``, ``momentum``, ``dampening``,
``nesterov``, ``weight_decay``, ``maximize``; see :func:`coefficients`). The engine
gathers ``⟨g_n, ∇L⟩`` (the gradient tests' :class:`~cockpit.quantities.GradDot`,
times N for a sum loss) and projections onto ``b`` and θ_t in the same backward pass,
so ``⟨g_n, Δθ⟩`` is a sum of N-vectors.

The prediction is used only where it is the update that happened: the gradients,
buffers and parameters the projections saw must be unchanged when the step starts
(gradient clipping, say, rescales ``∇L`` in place and is caught by the version
counters), and after the step the actual update must equal the predicted one to
rounding (:func:`matches`). Otherwise the caller projects the kept factors as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["PROJ_BUFFER", "PROJ_PARAM", "Coefficients", "SGDPlan", "arm", "coefficients"]

#: Projection keys of the momentum buffers and of θ_t.
PROJ_BUFFER = "cockpit:sgd_momentum_buffer"
PROJ_PARAM = "cockpit:sgd_param"
#: Rounding allowance of :func:`matches`, in units of the dtype's machine epsilon.
ROUNDING = 16.0


@dataclass(frozen=True)
class Coefficients:
    """``Δθ = g·∇L + b·buffer + theta·θ_t`` for one parameter.

    Example:
        >>> c = Coefficients(g=-0.1, b=-0.09, theta=0.0)  # SGD(lr=0.1, momentum=0.9)
        >>> round(c.g * 2.0 + c.b * 1.0, 12)  # the update of an entry with ∇L = 2, buffer = 1
        -0.29
    """

    g: float
    b: float
    theta: float


def coefficients(group: dict, has_buffer: bool) -> Coefficients:
    """The coefficients of ``torch.optim.SGD``'s update for a parameter of ``group``.

    SGD computes ``d = ±∇L + wd·θ`` (minus when maximizing), then with momentum μ
    ``buf ← μ·buf + (1 − dampening)·d`` (``buf ← d`` on the first step), steps along
    ``buf`` or, with Nesterov, ``d + μ·buf``, and updates ``θ ← θ − lr·step``.

    Args:
        group: An SGD parameter group.
        has_buffer: Whether the parameter has a momentum buffer before the step.

    Example:
        >>> group = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
        ...              weight_decay=0.01, maximize=False)
        >>> coefficients(group, has_buffer=True)  # −0.1·(0.9·buf + ∇L + 0.01·θ)
        Coefficients(g=-0.1, b=-0.09000000000000001, theta=-0.001)
        >>> coefficients(dict(group, nesterov=True), has_buffer=False)  # first step: buf = d
        Coefficients(g=-0.19, b=-0.0, theta=-0.0019)
    """
    lr = float(group["lr"])
    mu = float(group.get("momentum", 0.0))
    damp = float(group.get("dampening", 0.0))
    nesterov = bool(group.get("nesterov", False))
    wd = float(group.get("weight_decay", 0.0))
    sign = -1.0 if group.get("maximize", False) else 1.0
    if mu == 0.0:
        k, kb = 1.0, 0.0
    elif has_buffer:
        k, kb = (1.0 + mu * (1.0 - damp), mu * mu) if nesterov else (1.0 - damp, mu)
    else:
        k, kb = (1.0 + mu if nesterov else 1.0), 0.0
    return Coefficients(g=-lr * k * sign, b=-lr * kb, theta=-lr * k * wd)


@dataclass
class SGDPlan:
    """What one tracked step asked the engine for, and what it must find unchanged.

    Attributes:
        directions: ``{projection key: {parameter name: tensor}}`` for the engine.
        groups: ``{parameter name: its parameter group}``.
        buffers: ``{parameter name: momentum buffer}`` of the parameters that have one.
        versions: Version counters of the buffers and parameters the projections read.
        grads: ``{parameter name: (p.grad, its version)}`` when the backward pass ended.
        before: Buffer values when the step started (for :func:`matches`).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
        >>> plan = arm(opt, dict(lin.named_parameters()))
        >>> plan.directions, sorted(plan.groups)  # no momentum buffer before the first step
        ({}, ['bias', 'weight'])
    """

    directions: dict[str, dict[str, Tensor]]
    groups: dict[str, dict]
    buffers: dict[str, Tensor]
    versions: dict[str, tuple[int, ...]]
    grads: dict[str, tuple[Tensor, int]] = field(default_factory=dict)
    before: dict[str, Tensor] = field(default_factory=dict)


def arm(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> SGDPlan | None:
    """The projections a tracked step needs to predict ``optimizer``'s update (or None).

    Only for ``torch.optim.SGD`` itself (a subclass may step differently) without
    ``differentiable``; every trainable parameter must belong to one of its groups.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1, weight_decay=0.01)
        >>> plan = arm(opt, dict(lin.named_parameters()))
        >>> sorted(plan.directions), sorted(plan.directions[PROJ_PARAM])  # θ_t for the decay
        (['cockpit:sgd_param'], ['bias', 'weight'])
        >>> arm(torch.optim.Adam(lin.parameters()), dict(lin.named_parameters())) is None
        True
    """
    if type(optimizer) is not torch.optim.SGD:
        return None
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    groups, buffers = {}, {}
    directions: dict[str, dict[str, Tensor]] = {}
    for name, p in params.items():
        group = group_of.get(id(p))
        if group is None or group.get("differentiable", False):
            return None
        groups[name] = group
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if float(group.get("momentum", 0.0)) != 0.0 and buf is not None:
            buffers[name] = buf
            directions.setdefault(PROJ_BUFFER, {})[name] = buf
        if float(group.get("weight_decay", 0.0)) != 0.0:
            directions.setdefault(PROJ_PARAM, {})[name] = p.detach()
    return SGDPlan(directions, groups, buffers, _versions(params, buffers))


def _versions(
    params: dict[str, nn.Parameter], buffers: dict[str, Tensor]
) -> dict[str, tuple[int, ...]]:
    """Version counters of each parameter and, where it has one, its momentum buffer."""
    return {
        k: (p._version, buffers[k]._version) if k in buffers else (p._version,)
        for k, p in params.items()
    }


def after_backward(plan: SGDPlan, params: dict[str, nn.Parameter]) -> None:
    """Record the gradients the backward pass left (their identity and version)."""
    plan.grads = {k: (p.grad, p.grad._version) for k, p in params.items() if p.grad is not None}


def before_step(plan: SGDPlan, params: dict[str, nn.Parameter]) -> bool:
    """At ``optimizer.step()``: whether the prediction still holds; snapshot the buffers.

    False when a gradient was replaced or changed in place since the backward pass
    (clipping, accumulation), or a buffer or parameter the projections read changed.
    """
    now = {k: p.grad for k, p in params.items() if p.grad is not None}
    if now.keys() != plan.grads.keys():
        return False
    for k, (g, version) in plan.grads.items():
        if now[k] is not g or g._version != version:
            return False
    if _versions(params, plan.buffers) != plan.versions:
        return False
    plan.before = {k: b.detach().clone() for k, b in plan.buffers.items()}
    return True


def matches(
    plan: SGDPlan, theta: dict[str, Tensor], delta: dict[str, Tensor]
) -> dict[str, Coefficients] | None:
    """The coefficients, if the actual update ``delta`` equals the prediction to rounding.

    Per parameter, ``‖Δθ − (c_g ∇L + c_b b + c_θ θ_t)‖`` must not exceed
    :data:`ROUNDING` machine epsilons times the norms of every term involved (θ_t,
    θ_{t+1} and each scaled input): what SGD's own float arithmetic can produce.

    Args:
        plan: The step's plan, after :func:`before_step`.
        theta: ``{name: θ_t}``.
        delta: ``{name: θ_{t+1} − θ_t}``.
    """
    coeffs: dict[str, Coefficients] = {}
    with torch.no_grad():
        for name, (grad, _) in plan.grads.items():
            if name not in delta:
                return None
            c = coefficients(plan.groups[name], name in plan.buffers)
            t, d = theta[name], delta[name]
            pred = grad.to(d.dtype) * c.g
            t_norm = float(t.norm())
            bound = t_norm + float((t + d).norm()) + abs(c.g) * float(grad.norm())
            if c.b != 0.0:
                pred = pred + plan.before[name].to(d.dtype) * c.b
                bound += abs(c.b) * float(plan.before[name].norm())
            if c.theta != 0.0:
                pred = pred + t * c.theta
                bound += abs(c.theta) * t_norm
            eps = torch.finfo(d.dtype).eps if d.dtype.is_floating_point else 0.0
            if not float((d - pred).norm()) <= ROUNDING * eps * bound:
                return None
            coeffs[name] = c
        # parameters without a gradient are not stepped by SGD
        for name, d in delta.items():
            if name not in plan.grads and bool(d.any()):
                return None
    return coeffs
