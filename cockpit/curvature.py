"""Curvature in the same backward pass: diagonal GGN (exact or Monte-Carlo) and Hessian.

Mechanism (see MATH.md, "Curvature"). The engine records, during the forward pass, the
loss module's input ``f`` (the model output) and target, the calls of the hooked layers
and of the elementwise activation modules. When a backward pass is armed with
curvature requests:

1. **GGN.** A tensor hook on ``f`` fires first. It factors the per-sample Hessian of the
   batch loss w.r.t. ``f`` as ``Σ_k S_k S_kᵀ`` (:func:`cockpit.losses.hessian_sqrt`: K
   exact columns, e.g. one per class for cross-entropy, or M sampled ones) and
   backpropagates all K columns at once to the outputs of the hooked layers with one
   batched vector-Jacobian product (``torch.autograd.grad(f, layer outputs, S,
   is_grads_batched=True, retain_graph=True)``). The ``[K, N, ...]`` results play the
   role of the output gradient: the layer rules (:mod:`cockpit.layers`), vmapped over
   K, turn them into :class:`~cockpit.factors.ColumnFactor` s whose layer input is
   shared by the K columns, and ``diag GGN(θ) = Σ_k Σ_n G[k, n](θ)²``
   (:meth:`~cockpit.factors.ColumnFactor.sum_of_squares`). Uses of one parameter
   (weight tying, recurrence) are merged per column before squaring, so they stay exact.
2. **Hessian residuals.** For an elementwise activation module ``y = φ(z)`` the Hessian
   gains ``J_zᵀ diag(φ''(z) ⊙ δ) J_z`` with ``δ = ∂L/∂y`` (BackPACK's DiagHessian
   recipe). A tensor hook on ``y`` receives δ during the user's backward pass; one
   one-hot column per feature of ``z`` is backpropagated from ``z`` to the earlier layer
   outputs the same way, and the squares are weighted by ``r = φ''(z) ⊙ δ`` (sign kept).
3. **Exactness.** ``diag GGN + residuals`` is the Hessian diagonal only if nothing else
   in the graph has second derivatives that reach a diagonal entry. Before the backward
   pass the engine walks the autograd graph from ``f`` and accepts only nodes that are
   linear, piecewise linear, hooked activation modules, operations on
   parameter-independent values, or bilinear products whose operands depend on
   disjoint sets of parameters (their cross terms are off-diagonal). Anything else
   (LayerNorm/GroupNorm, softmax/attention, a functional ``torch.tanh``, a weight used
   in a product with something that depends on it, ...) or a residual cost above
   :attr:`~cockpit.quantities.DiagHessian.residual_budget` makes
   :class:`~cockpit.quantities.DiagHessian` fall back to a Hutchinson estimate with a
   warning that names the reason.

Scaling: the columns already include the normalization of the loss reduction, so all
diagonals are those of the *batch* loss ``L`` (``1/N`` included under mean reduction);
they are not rescaled like the per-sample first-order quantities.

The GGN splits the graph at the loss module's input: a model that ends in
``log_softmax`` followed by ``nn.NLLLoss`` (linear in its input) has a zero GGN there;
use ``nn.CrossEntropyLoss`` on the logits instead.

Assumptions: the backward pass is ``L.backward()`` on the loss module's output (the
Hessian residuals use the gradient that actually arrives at each activation), the
samples do not interact (no BatchNorm in train mode), and the loss input's rows are the
N samples, or N·T rows of a flattened sequence layout.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from cockpit.factors import (
    AffineFactor,
    ColumnAffineFactor,
    ColumnDenseFactor,
    ColumnEmbeddingFactor,
    ColumnFactor,
    EmbeddingFactor,
    combine_columns,
)
from cockpit.losses import classify, hessian_sqrt
from cockpit.quantities import DiagGGN, DiagHessian, Gathered, Quantity

__all__ = [
    "ActivationRule",
    "activation_rule",
    "column_factors",
    "GraphReport",
    "analyze_graph",
    "CurvaturePass",
    "CHUNK_ELEMENTS",
    "BATCHED_BELOW",
]

#: Largest number of elements of the batched vector-Jacobian products held at once
#: (columns are processed in chunks below it).
CHUNK_ELEMENTS = 1 << 26
#: Columns are backpropagated in one vmapped pass (``is_grads_batched``) when one column's
#: products have fewer elements than this; above it, a loop of plain backward passes is
#: as fast (per-call overhead is negligible, and several backward ops, e.g. max-pooling,
#: have no batching rule, whose fallback is slower than the loop).
BATCHED_BELOW = 1 << 20


# ----------------------------------------------------------------------------------------
# elementwise activation modules
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationRule:
    """How to get ``φ''`` of an elementwise activation module.

    Attributes:
        from_output: ``φ''`` is a function of the output ``y`` (kept by autograd for the
            module's own backward, so recording it costs no memory); otherwise of the
            input ``z`` (likewise kept by autograd for these modules).
        second_derivative: ``f(module, value) -> φ''`` from ``y`` or ``z``; None: obtained
            by double differentiation of the module itself.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.func import grad, vmap
        >>> from cockpit.curvature import activation_rule
        >>> rule = activation_rule(nn.Tanh())
        >>> rule.from_output  # φ''(z) = -2 y (1 - y²) from the output y = tanh(z)
        True
        >>> z = torch.linspace(-2, 2, 5, dtype=torch.float64)  # any shape, elementwise
        >>> phi2 = rule.second_derivative(nn.Tanh(), torch.tanh(z))
        >>> torch.allclose(phi2, vmap(grad(grad(torch.tanh)))(z))
        True
        >>> activation_rule(nn.GELU()).second_derivative is None  # double differentiation
        True
    """

    from_output: bool
    second_derivative: Callable[[nn.Module, Tensor], Tensor] | None = None


def _tanh2(module: nn.Module, y: Tensor) -> Tensor:
    return -2 * y * (1 - y * y)


def _sigmoid2(module: nn.Module, y: Tensor) -> Tensor:
    return y * (1 - y) * (1 - 2 * y)


_ACTIVATIONS: dict[type, ActivationRule] = {
    nn.Tanh: ActivationRule(True, _tanh2),
    nn.Sigmoid: ActivationRule(True, _sigmoid2),
    nn.GELU: ActivationRule(False),
    nn.SiLU: ActivationRule(False),
    nn.Softplus: ActivationRule(False),
    nn.ELU: ActivationRule(False),
    nn.CELU: ActivationRule(False),
    nn.SELU: ActivationRule(False),
    nn.Mish: ActivationRule(False),
    nn.LogSigmoid: ActivationRule(False),
    nn.Hardswish: ActivationRule(False),
}


def activation_rule(module: nn.Module) -> ActivationRule | None:
    """The rule of a supported elementwise activation module (exact type), or None.

    In-place modules (``inplace=True``) overwrite their input and are not supported.

    Example:
        >>> from torch import nn
        >>> from cockpit.curvature import activation_rule
        >>> activation_rule(nn.Sigmoid()) is not None
        True
        >>> activation_rule(nn.ReLU()) is None  # piecewise linear: no residual term
        True
        >>> activation_rule(nn.SiLU(inplace=True)) is None  # overwrites its input
        True
    """
    rule = _ACTIVATIONS.get(type(module))
    if rule is None or getattr(module, "inplace", False):
        return None
    return rule


def second_derivative(module: nn.Module, rule: ActivationRule, value: Tensor) -> Tensor:
    """``φ''`` elementwise, from the recorded output (or input) ``value``."""
    if rule.second_derivative is not None:
        return rule.second_derivative(module, value)
    with torch.enable_grad():
        z = value.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(module(z).sum(), z, create_graph=True)
        if not d1.requires_grad:  # linear everywhere on this input
            return torch.zeros_like(value)
        (d2,) = torch.autograd.grad(d1.sum(), z, allow_unused=True)
    return torch.zeros_like(value) if d2 is None else d2


# ----------------------------------------------------------------------------------------
# layer rules over K columns
# ----------------------------------------------------------------------------------------


def _shared(t: Tensor) -> Tensor:
    """A vmap output that did not depend on the column (expanded, stride 0) → ``[1, ...]``."""
    return t[:1] if t.dim() > 0 and t.shape[0] > 1 and t.stride(0) == 0 else t


def column_factors(
    rule_fn: Callable, module: nn.Module, args: tuple, kwargs: dict, grads: Sequence, wanted
) -> dict[str, ColumnFactor]:
    """Run a layer rule on K columns of output gradients at once.

    The rule is vmapped over the leading K axis of ``grads`` (``[K, *output.shape]`` or
    None per output); outputs of the rule that do not depend on the gradients (the layer
    input ``a``, embedding indices) come back shared (``[1, ...]``), never copied K times.
    Falls back to a loop over the columns where the rule cannot be vmapped.

    Returns:
        ``{local parameter name: ColumnFactor}``.

    Example:
        K output-gradient columns through a linear layer; the diagonal curvature is their
        second moment over the K·N pseudo-samples:

        >>> import torch
        >>> from cockpit.curvature import column_factors
        >>> from cockpit.layers import find_rule
        >>> layer = torch.nn.Linear(3, 2).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)  # [N, D_in]
        >>> cols = torch.randn(5, 4, 2, dtype=torch.float64)  # [K, N, D_out]
        >>> wanted = frozenset({"weight", "bias"})
        >>> fs = column_factors(find_rule(layer).fn, layer, (x,), {}, [cols], wanted)
        >>> sorted(fs), fs["weight"].k, fs["weight"].n
        (['bias', 'weight'], 5, 4)
        >>> diag = fs["weight"].sum_of_squares()  # [D_out, D_in]
        >>> torch.allclose(diag, torch.einsum("kno,ni->oi", cols**2, x**2))
        True
    """
    k = next(g.shape[0] for g in grads if g is not None)
    if k == 1:  # no vmap needed
        single = rule_fn(
            module, args, kwargs, tuple(None if g is None else g[0] for g in grads), wanted
        )
        return {name: _as_column(f) for name, f in single.items()}
    meta: dict[str, tuple] = {}

    def one(*gs):
        out = {}
        for name, f in rule_fn(module, args, kwargs, gs, wanted).items():
            if isinstance(f, AffineFactor):
                meta[name] = ("affine", f.shape)
                out[name] = (f.a, f.b)
            elif isinstance(f, EmbeddingFactor):
                meta[name] = ("embedding", f.num_embeddings, f.padding_idx)
                out[name] = (f.idx, f.g)
            else:
                meta[name] = ("dense",)
                out[name] = (f.to_dense(),)
        return out

    in_dims = tuple(None if g is None else 0 for g in grads)
    try:
        outs = torch.func.vmap(one, in_dims=in_dims, randomness="error")(*grads)
    except Exception as err:  # a rule without batching support: loop over the columns
        warnings.warn(
            f"layer rule for {type(module).__name__} could not be vmapped over curvature "
            f"columns ({type(err).__name__}: {err}); looping over {k} columns instead",
            RuntimeWarning,
            stacklevel=2,
        )
        per_k = [one(*(None if g is None else g[i] for g in grads)) for i in range(k)]
        outs = {
            name: tuple(
                torch.stack([p[name][j] for p in per_k]) for j in range(len(per_k[0][name]))
            )
            for name in per_k[0]
        }
    factors: dict[str, ColumnFactor] = {}
    for name, tensors in outs.items():
        kind = meta[name]
        if kind[0] == "affine":
            a, b = (_shared(t) for t in tensors)
            factors[name] = ColumnAffineFactor(a, b, kind[1])
        elif kind[0] == "embedding":
            idx, g = _shared(tensors[0]), tensors[1]
            if idx.shape[0] == 1:
                factors[name] = ColumnEmbeddingFactor(idx[0], g, kind[1], kind[2])
            else:  # indices that depend on the column (never for nn.Embedding)
                dense = [
                    EmbeddingFactor(idx[i], g[i], kind[1], kind[2]).to_dense() for i in range(k)
                ]
                factors[name] = ColumnDenseFactor(torch.stack(dense))
        else:
            factors[name] = ColumnDenseFactor(tensors[0].expand(k, *tensors[0].shape[1:]))
    return factors


def _as_column(f) -> ColumnFactor:
    """One column: a per-sample factor with a leading axis of size 1."""
    if hasattr(f, "as_column"):  # e.g. a convolution's grouped weight-gradient kernel
        return f.as_column()
    if isinstance(f, AffineFactor):
        return ColumnAffineFactor(f.a[None], f.b[None], f.shape)
    if isinstance(f, EmbeddingFactor):
        return ColumnEmbeddingFactor(f.idx, f.g[None], f.num_embeddings, f.padding_idx)
    return ColumnDenseFactor(f.to_dense()[None])


# ----------------------------------------------------------------------------------------
# the autograd graph: index by sequence number, prove the Hessian diagonal exact
# ----------------------------------------------------------------------------------------

#: Nodes linear in each of their inputs (sums of linear maps; no products of inputs).
LINEAR_NODES = frozenset(
    """AddBackward0 AddBackward1 SubBackward0 SubBackward1 RsubBackward0 RsubBackward1
    NegBackward0 ViewBackward0 UnsafeViewBackward0 ReshapeAliasBackward0 ExpandBackward0
    PermuteBackward0 TransposeBackward0 TransposeBackward1 TBackward0 SqueezeBackward0
    SqueezeBackward1 SqueezeBackward2 SqueezeBackward3 SqueezeBackward4 UnsqueezeBackward0
    UnsqueezeBackward1 SelectBackward0 SliceBackward0 IndexBackward0 IndexSelectBackward0
    GatherBackward0 CatBackward0 StackBackward0 SplitBackward0 SplitWithSizesBackward0
    UnbindBackward0 SumBackward0 SumBackward1 MeanBackward0 MeanBackward1 CloneBackward0
    ToCopyBackward0 ConstantPadNdBackward0 ReflectionPad1DBackward0 ReflectionPad2DBackward0
    ReflectionPad3DBackward0 ReplicationPad1DBackward0 ReplicationPad2DBackward0
    ReplicationPad3DBackward0 AvgPool2DBackward0 AvgPool3DBackward0
    AdaptiveAvgPool2DBackward0 AdaptiveAvgPool3DBackward0 NativeDropoutBackward0
    EmbeddingBackward0 EmbeddingBagBackward0 MaskedFillBackward0 WhereBackward0
    RepeatBackward0 FlipBackward0 RollBackward0 PixelShuffleBackward0
    PixelUnshuffleBackward0 UpsampleNearest1DBackward0 UpsampleNearest2DBackward0
    UpsampleNearest3DBackward0 UpsampleLinear1DBackward0 UpsampleBilinear2DBackward0
    UpsampleTrilinear3DBackward0 Im2ColBackward0 Col2ImBackward0 AsStridedBackward0
    DiagonalBackward0 TrilBackward0 TriuBackward0 NarrowBackward0 AliasBackward0
    ValuesBackward0 UnfoldBackward0 ExpandAsBackward0 ViewAsRealBackward0
    ViewAsComplexBackward0 CumsumBackward0 TraceBackward0 LerpBackward0 LerpBackward1""".split()
)
#: Piecewise-linear nodes (zero second derivative almost everywhere).
PIECEWISE_LINEAR_NODES = frozenset(
    """ReluBackward0 LeakyReluBackward0 HardtanhBackward0 ThresholdBackward0
    HardsigmoidBackward0 MaxPool1DWithIndicesBackward0 MaxPool2DWithIndicesBackward0
    MaxPool3DWithIndicesBackward0 AdaptiveMaxPool1DBackward0 AdaptiveMaxPool2DBackward0
    AdaptiveMaxPool3DBackward0 AbsBackward0 ClampBackward0 ClampBackward1 ClampMinBackward0
    ClampMaxBackward0 MaxBackward0 MaxBackward1 MinBackward0 MinBackward1 AmaxBackward0
    AminBackward0 MaximumBackward0 MinimumBackward0 FmaxBackward0 FminBackward0
    SoftshrinkBackward0 HardshrinkBackward0 SortBackward0 TopkBackward0 KthvalueBackward0
    MedianBackward0 MedianBackward1 SignBackward0 RoundBackward0 FloorBackward0
    CeilBackward0 TruncBackward0""".split()
)
#: Products: linear in each operand; exact when the operands' parameters are disjoint.
BILINEAR_NODES = frozenset(
    """MulBackward0 MulBackward1 MmBackward0 AddmmBackward0 BmmBackward0 BaddbmmBackward0
    AddmvBackward0 MvBackward0 DotBackward0 VdotBackward0 AddbmmBackward0 AddcmulBackward0
    ConvolutionBackward0 ConvolutionBackwardOverrideable0 MkldnnConvolutionBackward0
    CudnnConvolutionBackward0 LinearBackward0 OuterBackward0 KronBackward0
    DivBackward1 NativeBatchNormBackward0 CudnnBatchNormBackward0
    MiopenBatchNormBackward0 NativeBatchNormLegitNoTrainingBackward0
    """.split()
)
#: Elementwise nonlinearities for which a hint is given when they are not hooked.
_ELEMENTWISE_HINTS = {
    "TanhBackward0": "nn.Tanh",
    "SigmoidBackward0": "nn.Sigmoid",
    "GeluBackward0": "nn.GELU",
    "SiluBackward0": "nn.SiLU",
    "SoftplusBackward0": "nn.Softplus",
    "EluBackward0": "nn.ELU",
    "EluBackward1": "nn.ELU (not in place)",
    "MishBackward0": "nn.Mish",
    "LogSigmoidBackward0": "nn.LogSigmoid",
    "HardswishBackward0": "nn.Hardswish",
    "CeluBackward0": "nn.CELU",
}


def _children(node) -> list:
    return [c for c, _ in node.next_functions if c is not None]


@dataclass
class GraphReport:
    """What the walk from the loss input found.

    Attributes:
        nodes: ``{sequence number: node}`` of every non-leaf node reachable.
        reasons: Why the Hessian diagonal is not provably ``GGN + residuals`` (empty:
            it is): one line per kind of offending node, naming up to three places.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from cockpit.curvature import analyze_graph
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> report = analyze_graph(model(torch.randn(5, 3)).grad_fn, param_bits={})
        >>> sorted(type(n).__name__ for n in report.nodes.values())
        ['AddmmBackward0', 'AddmmBackward0', 'ReluBackward0', 'TBackward0', 'TBackward0']
        >>> report.reasons  # piecewise linear: the Hessian diagonal is the GGN's
        []
    """

    nodes: dict[int, object]
    reasons: list[str] = field(default_factory=list)


def analyze_graph(
    root,
    param_bits: dict[int, int] | None = None,
    activations: dict[int, int | None] | None = None,
    module_of: dict[int, str] | None = None,
    max_places: int = 3,
) -> GraphReport:
    """Index the graph below ``root`` and, if ``param_bits`` is given, check exactness.

    Args:
        root: The autograd node of the loss input.
        param_bits: ``{id(parameter): bit}`` of the tracked parameters (None: index only).
        activations: ``{sequence number of y's node: sequence number of z's node}`` of the
            hooked activation calls (their internals are skipped).
        module_of: ``{sequence number: "module description"}`` for messages.
        max_places: Places named per reason.

    Returns:
        A :class:`GraphReport`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from cockpit.curvature import analyze_graph
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> bits = {id(p): 1 << i for i, p in enumerate(model.parameters())}
        >>> report = analyze_graph(model(torch.randn(5, 3)).grad_fn, bits)
        >>> report.reasons  # so DiagHessian falls back to Hutchinson, with this warning
        ['NativeLayerNormBackward0: nonlinear operation (second derivatives not covered ...)']
    """
    activations = activations or {}
    module_of = module_of or {}
    nodes: dict[int, object] = {}
    masks: dict[object, int] = {}
    found: dict[tuple[str, str], list[str]] = {}
    check = param_bits is not None

    def kids(node) -> list:
        seq = node._sequence_nr()
        if seq in activations and node is nodes.get(seq):
            z_seq = activations[seq]
            if z_seq is None:
                return []
            # skip the module's internals down to its input z
            found, stack, seen = [], _children(node), set()
            while stack:
                c = stack.pop()
                if c in seen:
                    continue
                seen.add(c)
                if type(c).__name__ == "AccumulateGrad":
                    continue
                if c._sequence_nr() == z_seq:
                    found.append(c)
                else:
                    stack.extend(_children(c))
            return found
        return _children(node)

    # iterative post-order DFS
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in masks:
            continue
        name = type(node).__name__
        if name == "AccumulateGrad":
            masks[node] = (param_bits or {}).get(id(node.variable), 0) if check else 0
            continue
        if not expanded:
            nodes.setdefault(node._sequence_nr(), node)
            stack.append((node, True))
            stack.extend((c, False) for c in kids(node) if c not in masks)
            continue
        child_masks = [masks.get(c, 0) for c in kids(node)]
        mask = 0
        for m in child_masks:
            mask |= m
        masks[node] = mask
        if not check or not mask:
            continue
        seq = node._sequence_nr()
        if seq in activations:
            continue
        aligned = [0 if c is None else masks.get(c, 0) for c, _ in node.next_functions]
        reason = _classify(node, name, aligned)
        if reason:
            found.setdefault((name, reason), []).append(module_of.get(seq, ""))
    reasons = []
    for (name, reason), places in found.items():
        named = [p for p in places if p][:max_places]
        where = (
            f" in {', '.join(named)}{', ...' if len(places) > len(named) else ''}" if named else ""
        )
        count = f" ×{len(places)}" if len(places) > 1 else ""
        reasons.append(f"{name}{count}{where}: {reason}")
    return GraphReport(nodes, reasons)


def _classify(node, name: str, child_masks: list[int]) -> str | None:
    """None if the node keeps the Hessian diagonal equal to GGN + residuals, else why not.

    ``child_masks`` are the parameter bit masks aligned with ``node.next_functions``.
    """
    if name in LINEAR_NODES or name in PIECEWISE_LINEAR_NODES:
        return None
    if name == "DivBackward0":  # x / y: linear in x only
        if len(child_masks) > 1 and child_masks[1]:
            return "division by a parameter-dependent tensor (nonlinear)"
        return None
    if name in BILINEAR_NODES:
        if name.startswith(("NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm")):
            if getattr(node, "_saved_training", False):
                return "batch normalization with batch statistics (train mode) is nonlinear"
        dependent = [m for m in child_masks if m]
        seen = 0
        for m in dependent:
            if seen & m:
                return (
                    "a product of two factors that depend on the same parameter (e.g. a "
                    "weight used twice, or weight tying); its cross terms reach the diagonal"
                )
            seen |= m
        return None
    hint = _ELEMENTWISE_HINTS.get(name)
    if hint is not None:
        return (
            f"elementwise nonlinearity not called through a hooked module (a functional call, "
            f"or an in-place module); use {hint} for an exact diagonal"
        )
    return "nonlinear operation (second derivatives not covered by the GGN + residual terms)"


# ----------------------------------------------------------------------------------------
# one armed backward pass
# ----------------------------------------------------------------------------------------


@dataclass
class _Target:
    """An accumulator: per-parameter sums of weighted squares."""

    values: dict[str, Tensor] = field(default_factory=dict)

    def add(self, name: str, value: Tensor) -> None:
        if name in self.values:
            self.values[name] = self.values[name] + value
        else:
            self.values[name] = value


class CurvaturePass:
    """The curvature part of one armed backward pass (created by the engine's ``gather``).

    Args:
        requests: The :class:`~cockpit.quantities.DiagGGN` /
            :class:`~cockpit.quantities.DiagHessian` keys.
        engine: The :class:`~cockpit.engine.Engine` (for its records and helpers).
        n: Batch size N.

    Example:
        The engine creates one per armed backward pass and forwards its hook events; a
        traced subclass shows their order for a tanh network:

        >>> import torch
        >>> from torch import nn
        >>> from unittest import mock
        >>> import cockpit.engine
        >>> from cockpit import Engine
        >>> from cockpit.curvature import CurvaturePass
        >>> from cockpit.quantities import DiagHessian
        >>> events = []
        >>> class Traced(CurvaturePass):
        ...     def on_loss_grad(self):
        ...         events.append("on_loss_grad")  # GGN: columns of the loss-Hessian root
        ...         super().on_loss_grad()
        ...     def on_activation_grad(self, act, grad):
        ...         events.append(f"on_activation_grad({type(act.module).__name__})")
        ...         super().on_activation_grad(act, grad)  # residual terms
        ...     def finish(self, result):
        ...         events.append("finish")  # writes the diagonals into result
        ...         super().finish(result)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> loss_fn = nn.CrossEntropyLoss()
        >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        >>> with Engine(model, loss_fn) as engine:
        ...     with mock.patch.object(cockpit.engine, "CurvaturePass", Traced):
        ...         loss = loss_fn(model(x), y)
        ...         with engine.gather([DiagHessian()]) as result:
        ...             loss.backward()
        >>> events
        ['on_loss_grad', 'on_activation_grad(Tanh)', 'finish']
        >>> result.notes[DiagHessian()]
        'exact: diagonal GGN + activation residual terms'
    """

    def __init__(self, requests: Iterable[Quantity], engine, n: int) -> None:
        self.requests = tuple(requests)
        self.engine = engine
        self.n = n
        gen = engine._generation
        loss = gen.loss
        if engine.loss_fn is None or not isinstance(engine.loss_fn, nn.Module):
            raise ValueError(
                "curvature needs the loss module: create the Engine with loss_fn=<the nn.Module "
                "called in the training loop> so its call can be recorded"
            )
        classify(engine.loss_fn)  # clear errors for reduction='none' etc.
        if loss is None:
            raise RuntimeError(
                f"no call of the loss module {type(engine.loss_fn).__name__} with gradients was "
                "recorded since the last backward pass; compute the loss with the engine's "
                "loss_fn before gather()"
            )
        if gen.loss_calls > 1:
            raise RuntimeError(
                f"the loss module was called {gen.loss_calls} times since the last backward pass; "
                "curvature needs exactly one loss call per backward pass"
            )
        self.loss = loss
        if not isinstance(loss.input, Tensor) or loss.input.grad_fn is None:
            raise ValueError(
                "the loss module's input does not depend on the parameters (no autograd graph)"
            )
        self.loss_key = (loss.input.grad_fn._sequence_nr(), loss.input.output_nr)
        if loss.input.dim() == 0 or loss.input.shape[0] % n:
            raise ValueError(
                f"the loss input has shape {tuple(loss.input.shape)}, whose rows do not split "
                f"into the batch of N = {n} samples (expected N or N·T rows)"
            )
        self.param_names = [k for k, v in gen.param_uses.items() if v]
        self.uses = sorted(engine._live_uses(), key=lambda u: u.order)
        self.acts = sorted(engine._live_activations(), key=lambda a: a.order)
        self.hessians = [q for q in self.requests if isinstance(q, DiagHessian)]
        self.hessian_exact = False
        self.reason = ""
        want_check = bool(self.hessians)
        module_of = {}
        for use in self.uses:
            for key in use.out_keys:
                if key is not None:
                    module_of[key[0]] = f"{use.hooked.name!r} ({type(use.module).__name__})"
        act_map = {a.out_key[0]: (None if a.in_key is None else a.in_key[0]) for a in self.acts}
        report = analyze_graph(
            loss.input.grad_fn,
            engine._param_bits() if want_check else None,
            act_map,
            module_of,
        )
        self.nodes = report.nodes
        self.use_edges = {id(u): self._edges(u.out_keys) for u in self.uses}
        if want_check:
            reasons = list(report.reasons)
            if not reasons:
                cost = self._residual_cost()
                budget = min(q.residual_budget for q in self.hessians)
                if cost > budget:
                    reasons.append(
                        f"the exact residual terms of the activation modules would produce "
                        f"{cost:.3g} elements, above residual_budget={budget:.3g}"
                    )
            self.hessian_exact = not reasons
            self.reason = "; ".join(reasons)
        self.ggn: dict[int, _Target] = {}  # {mc_samples (0: exact): accumulator}
        for q in self.requests:
            if isinstance(q, DiagGGN):
                self.ggn[q.mc_samples] = _Target()
        if self.hessian_exact:
            self.ggn.setdefault(0, _Target())
        self.residual = _Target()
        self.loss_done = False

    # ------------------------------------------------------------------ helpers
    def _edges(self, keys: Sequence[tuple[int, int] | None]) -> list[GradientEdge | None]:
        out: list[GradientEdge | None] = []
        for key in keys:
            node = None if key is None else self.nodes.get(key[0])
            out.append(None if node is None else GradientEdge(node, key[1]))
        return out

    def _residual_cost(self) -> int:
        total = 0
        for act in self.acts:
            if act.in_key is None or act.in_key[0] not in self.nodes:
                continue
            upstream = sum(u.out_numel for u in self.uses if u.order < act.order)
            total += (act.numel // max(1, act.value.shape[0])) * (upstream + act.numel)
        return total

    def _backprop(
        self,
        output,
        columns: Tensor,
        uses: list,
        weights: Tensor | None,
        target: _Target,
    ) -> None:
        """Backpropagate ``columns [K, *output.shape]`` to the uses' outputs and reduce."""
        edges, owners = [], []
        for use in uses:
            for i, e in enumerate(self.use_edges[id(use)]):
                if e is not None:
                    edges.append(e)
                    owners.append((use, i))
        if not edges:
            return
        k = columns.shape[0]
        numel = sum(use.out_numel for use in uses) + columns[0].numel()
        chunk = max(1, min(k, CHUNK_ELEMENTS // max(1, numel)))
        batched = numel < BATCHED_BELOW
        for k0 in range(0, k, chunk):
            cols = columns[k0 : k0 + chunk]
            grads = self._vjp(output, edges, cols, batched)
            per_use: dict[int, list] = {}
            for (use, i), g in zip(owners, grads, strict=True):
                if g is not None:
                    per_use.setdefault(id(use), [use, [None] * len(use.out_keys)])[1][i] = g
            w = None if weights is None else weights[k0 : k0 + chunk]
            self._reduce(list(per_use.values()), w, target)

    def _vjp(self, output, edges: list, cols: Tensor, batched: bool) -> list[Tensor | None]:
        """``[K, ...]`` vector-Jacobian products of the K columns, batched or one by one."""
        engine = self.engine
        engine._in_curvature = True
        try:
            if batched and cols.shape[0] > 1:
                try:
                    return list(
                        torch.autograd.grad(
                            [output],
                            edges,
                            [cols],
                            retain_graph=True,
                            allow_unused=True,
                            is_grads_batched=True,
                        )
                    )
                except RuntimeError:  # an op without batching support: loop instead
                    pass
            per_col = [
                torch.autograd.grad([output], edges, [c], retain_graph=True, allow_unused=True)
                for c in cols
            ]
        finally:
            engine._in_curvature = False
        if len(per_col) == 1:
            return [None if g is None else g.unsqueeze(0) for g in per_col[0]]
        return [
            None if per_col[0][j] is None else torch.stack([g[j] for g in per_col])
            for j in range(len(edges))
        ]

    def _reduce(self, per_use: list, weights: Tensor | None, target: _Target) -> None:
        engine = self.engine
        by_param: dict[str, list[ColumnFactor]] = {}
        engine._suspended = True
        try:
            with torch.no_grad():
                for use, grads in per_use:
                    factors = column_factors(
                        use.hooked.rule.fn, use.module, use.args, use.kwargs, grads, use.wanted
                    )
                    for local, f in factors.items():
                        name = engine._names[use.hooked.params[local]]
                        by_param.setdefault(name, []).append(f)
                for name, fs in by_param.items():
                    target.add(name, combine_columns(fs).sum_of_squares(weights))
        finally:
            engine._suspended = False

    # ------------------------------------------------------------- hook events
    def on_loss_grad(self) -> None:
        """The loss input's gradient arrived: backpropagate the loss-Hessian square roots."""
        if self.loss_done:
            return
        self.loss_done = True
        loss = self.loss
        f = loss.input
        for m, target in self.ggn.items():
            gen = self.engine.generator(f.device) if m else None
            with self.engine._suspend():  # generic losses are re-evaluated inside
                cols = hessian_sqrt(
                    self.engine.loss_fn,
                    f.detach(),
                    loss.target,
                    mc_samples=m or None,
                    generator=gen,
                    batch_size=self.n,
                )
            self._backprop(f, cols.to(f.dtype), self.uses, None, target)

    def on_activation_grad(self, act, grad: Tensor) -> None:
        """An activation module's output gradient δ arrived: add its residual terms."""
        if not self.hessian_exact or act.in_key is None or act.in_key[0] not in self.nodes:
            return
        node = self.nodes[act.in_key[0]]
        z_edge = GradientEdge(node, act.in_key[1])
        upstream = [u for u in self.uses if u.order < act.order]
        if not upstream:
            return
        self.engine._suspended = True
        try:
            phi2 = second_derivative(act.module, act.rule, act.value)
        finally:
            self.engine._suspended = False
        n = act.value.shape[0]
        r = (phi2 * grad).reshape(n, -1)
        features = torch.nonzero(r.ne(0).any(0)).reshape(-1)
        if features.numel() == 0:
            return
        q = r.shape[1]
        k = features.numel()
        cols = r.new_zeros(k, n, q)
        cols[torch.arange(k, device=r.device), :, features] = 1.0
        cols = cols.reshape(k, *act.value.shape)
        weights = r[:, features].T.contiguous()  # [K, N], signed
        self._backprop(z_edge, cols, upstream, weights, self.residual)

    # ------------------------------------------------------------------ results
    def finish(self, result: Gathered) -> None:
        """Write the requested diagonals into ``result`` (runs the fallback if needed)."""
        if not self.loss_done:
            raise RuntimeError(
                "the backward pass did not reach the loss module's input, so the curvature "
                "columns could not be backpropagated; call backward() on the loss returned by "
                "the engine's loss_fn"
            )
        engine = self.engine
        names = self.param_names
        params = engine._params_by_name()

        def full(values: dict[str, Tensor]) -> dict[str, Tensor]:
            out = {}
            for name in names:
                v = values.get(name)
                out[name] = torch.zeros_like(params[name]) if v is None else v.detach()
            return out

        for q in self.requests:
            if isinstance(q, DiagGGN):
                result.per_param[q] = full(self.ggn[q.mc_samples].values)
                result.exact[q] = q.mc_samples == 0
                result.notes[q] = (
                    "exact diagonal GGN of the batch loss"
                    if q.mc_samples == 0
                    else f"Monte-Carlo diagonal GGN ({q.mc_samples} sample(s)) of the batch loss"
                )
        for q in self.hessians:
            if self.hessian_exact:
                ggn = full(self.ggn[0].values)
                res = self.residual.values
                result.per_param[q] = {k: v + res[k] if k in res else v for k, v in ggn.items()}
                result.exact[q] = True
                result.notes[q] = "exact: diagonal GGN + activation residual terms"
            else:
                warnings.warn(
                    f"DiagHessian: not provably exact for this model ({self.reason}); returning "
                    f"a Hutchinson estimate with {q.probes} probes instead",
                    UserWarning,
                    stacklevel=4,
                )
                op = engine.hessian_operator()
                diag = _hutchinson_diag(op, q.probes, engine.generator(op.device))
                values = op.unflatten(diag)
                result.per_param[q] = full({k: v for k, v in values.items() if k in names})
                result.exact[q] = False
                result.notes[q] = f"Hutchinson estimate ({q.probes} probes): {self.reason}"


def _hutchinson_diag(op, probes: int, generator: torch.Generator) -> Tensor:
    from cockpit.linops import hutchinson_diagonal

    return hutchinson_diagonal(op, probes, generator)
