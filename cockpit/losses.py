"""Loss-function adapters: per-sample losses and square roots of the output Hessian.

The engine needs two things from the loss module the user calls as
``loss_fn(output, target)``:

* :func:`individual_losses` — per-sample losses ``l_n`` with ``L = (1/N) Σ_n l_n``
  (mean-type reductions) or ``L = Σ_n l_n`` (``reduction="sum"``);
* :func:`hessian_sqrt` — columns ``S_k`` with ``Σ_k vec(S_k[n]) vec(S_k[n])ᵀ = ∂²L/∂f_n∂f_n``,
  the diagonal block of the Hessian of the *batch* loss ``L`` (normalization of the
  reduction included) w.r.t. sample ``n``'s output ``f_n``. The engine backpropagates each
  column as an output gradient and squares per sample, which yields the diagonal of the
  generalized Gauss-Newton matrix (see MATH.md, "Curvature").

Exact columns never mix positions that the loss treats independently (sequence positions of
a cross-entropy, the elements of MSE/BCE): each exact column is nonzero at one position per
sample, so no spurious cross terms between positions arise when the engine squares
``J_n S_k[n]``. Monte-Carlo columns cover all positions at once; their cross terms between
positions vanish in expectation because the positions are sampled independently.

Closed forms are used for ``nn.CrossEntropyLoss``, ``nn.MSELoss`` and
``nn.BCEWithLogitsLoss`` (exact type match; subclasses take the generic path). Every other
loss (the generic path) must be *separable over the batch*: ``L`` is a sum or mean of
per-sample terms, each depending on one sample's outputs only. Its per-sample Hessian
blocks are obtained with ``torch.func`` Hessian-vector products and factored by a symmetric
eigendecomposition.

Batch layout. ``N`` (the batch size) is ``output.shape[0]`` unless ``batch_size`` is given.
Passing ``batch_size`` supports the flattened language-model layout, where the model output
``[N, T, C]`` was reshaped to ``[N·T, C]`` before the loss: row ``r`` then belongs to sample
``r // T``.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LossInfo", "classify", "hessian_sqrt", "individual_losses"]

_MEAN_LIKE = {"mean": "mean", "batchmean": "mean", "sum": "sum"}


@dataclass(frozen=True)
class LossInfo:
    """What the engine needs to know about a loss module.

    Attributes:
        kind: ``"ce"`` (``nn.CrossEntropyLoss``), ``"mse"`` (``nn.MSELoss``), ``"bce"``
            (``nn.BCEWithLogitsLoss``) or ``"generic"`` (anything else; assumed separable
            over the batch).
        reduction: ``"mean"`` when ``L = (1/N) Σ_n l_n`` (torch's ``"mean"``, and
            ``"batchmean"`` of ``nn.KLDivLoss``), ``"sum"`` when ``L = Σ_n l_n``, ``None``
            for a generic callable without a ``reduction`` attribute (its per-sample losses
            are then unavailable; its Hessian square root still works).
        name: The module's class name, used in messages.

    Example:
        >>> import torch
        >>> from cockpit.losses import LossInfo, classify
        >>> info = classify(torch.nn.CrossEntropyLoss())
        >>> info == LossInfo(kind="ce", reduction="mean", name="CrossEntropyLoss")
        True
        >>> classify(torch.nn.KLDivLoss(reduction="batchmean")).reduction  # L = (1/N) Σ l_n
        'mean'

    """

    kind: str
    reduction: str | None
    name: str


def _name(loss_fn: Callable) -> str:
    return type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else repr(loss_fn)


def classify(loss_fn: Callable) -> LossInfo:
    """Classify a loss module and check that the engine supports its settings.

    Args:
        loss_fn: The loss module (or callable) the user calls as ``loss_fn(output, target)``.

    Returns:
        The :class:`LossInfo` of ``loss_fn``.

    Raises:
        ValueError: For ``reduction="none"`` (the engine needs a scalar loss) or an unknown
            reduction; the message names the module.

    Example:
        >>> import torch
        >>> from cockpit.losses import classify
        >>> classify(torch.nn.MSELoss(reduction="sum"))
        LossInfo(kind='mse', reduction='sum', name='MSELoss')
        >>> classify(torch.nn.HuberLoss()).kind  # no closed form: the generic path
        'generic'
        >>> classify(torch.nn.MSELoss(reduction="none"))
        Traceback (most recent call last):
        ...
        ValueError: MSELoss has reduction='none'; the engine needs a scalar batch loss, ...

    """
    name = _name(loss_fn)
    raw = getattr(loss_fn, "reduction", None)
    if raw is None:
        reduction = None
    elif raw == "none":
        raise ValueError(
            f"{name} has reduction='none'; the engine needs a scalar batch loss, "
            "use reduction='mean' or 'sum'."
        )
    elif raw in _MEAN_LIKE:
        reduction = _MEAN_LIKE[raw]
    else:
        raise ValueError(f"{name} has unsupported reduction {raw!r}; use 'mean' or 'sum'.")
    kind = {nn.CrossEntropyLoss: "ce", nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce"}.get(
        type(loss_fn), "generic"
    )
    if kind != "generic" and reduction is None:
        raise ValueError(f"{name} has no reduction attribute.")
    return LossInfo(kind=kind, reduction=reduction, name=name)


# ----------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------


def _num_samples(output: Tensor, batch_size: int | None, name: str) -> int:
    """Return N, checking that the output's rows split evenly into samples."""
    if output.dim() == 0:
        raise ValueError(f"{name}: the output has no batch dimension.")
    rows = output.shape[0]
    if batch_size is None:
        return rows
    if batch_size <= 0 or rows % batch_size != 0:
        raise ValueError(
            f"{name}: output has {rows} rows, not divisible into batch_size={batch_size} "
            "samples (the flattened layout needs rows = N·T)."
        )
    return batch_size


def _check_mc(mc_samples: int | None) -> None:
    if mc_samples is not None and (int(mc_samples) != mc_samples or mc_samples < 1):
        raise ValueError(f"mc_samples must be a positive integer or None, got {mc_samples!r}")


def _clamp_nonnegative(x: Tensor, name: str, what: str) -> Tensor:
    """Clamp negative curvature coefficients to zero, with a warning."""
    if bool((x < 0).any()):
        warnings.warn(
            f"{name}: negative {what} (negative weights or targets outside their range); "
            "the loss is not convex in the outputs there, the GGN would not be positive "
            "semi-definite; the negative part is dropped.",
            RuntimeWarning,
            stacklevel=3,
        )
        x = x.clamp(min=0)
    return x


def _group_sum(u: Tensor, n: int) -> Tensor:
    """Sum an unreduced loss ``[rows, ...]`` over the rows and positions of each sample."""
    return u.reshape(n, -1).sum(1)


def _target_like(output: Tensor, target: Tensor, name: str) -> Tensor:
    """Broadcast an elementwise loss's target to the output shape (it must not grow it)."""
    shape = torch.broadcast_shapes(output.shape, target.shape)
    if shape != output.shape:
        raise ValueError(
            f"{name}: target shape {tuple(target.shape)} broadcasts the output "
            f"{tuple(output.shape)} to {tuple(shape)}; not supported."
        )
    return target.detach().to(output.dtype).expand(output.shape)


# ----------------------------------------------------------------------------------------
# cross-entropy
# ----------------------------------------------------------------------------------------


def _ce_class_indices(output: Tensor, target: Tensor) -> bool:
    return not (target.shape == output.shape and target.is_floating_point())


def _ce_check(loss_fn: nn.CrossEntropyLoss, output: Tensor, target: Tensor) -> None:
    name = _name(loss_fn)
    if output.dim() < 2:
        raise ValueError(
            f"{name}: unbatched input of shape {tuple(output.shape)}; the engine needs "
            "[N, C, ...] outputs."
        )
    if _ce_class_indices(output, target):
        expected = output.shape[:1] + output.shape[2:]
        if target.shape != expected:
            raise ValueError(
                f"{name}: target shape {tuple(target.shape)} does not match output "
                f"{tuple(output.shape)} (expected class indices of shape {tuple(expected)} "
                "or class probabilities of the output's shape)."
            )


def _ce_denominator(loss_fn: nn.CrossEntropyLoss, output: Tensor, target: Tensor) -> Tensor:
    """Normalization of the batch loss: ``L = Σ (per-position losses) / denominator``."""
    one = torch.ones((), dtype=output.dtype, device=output.device)
    if loss_fn.reduction == "sum":
        return one
    if not _ce_class_indices(output, target):
        return one * (output.numel() // output.shape[1])  # number of positions
    valid = target != loss_fn.ignore_index
    if loss_fn.weight is None:
        return valid.sum().to(output.dtype)
    weight = loss_fn.weight.detach().to(output.dtype)
    return (weight[torch.where(valid, target, 0)] * valid).sum()


def _ce_canonical(output: Tensor, n: int) -> Tensor:
    """``[rows, C, *d] -> [N, P, C]`` with ``P = (rows/N)·prod(d)`` positions per sample."""
    c = output.shape[1]
    return output.movedim(1, -1).reshape(n, -1, c)


def _ce_from_canonical(cols: Tensor, output_shape: torch.Size) -> Tensor:
    """``[K, N, P, C] -> [K, rows, C, *d]`` (inverse of :func:`_ce_canonical` per column)."""
    rows, c, spatial = output_shape[0], output_shape[1], output_shape[2:]
    k = cols.shape[0]
    return cols.reshape(k, rows, *spatial, c).movedim(-1, 2)


def _ce_probs_and_beta(
    loss_fn: nn.CrossEntropyLoss, output: Tensor, target: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """Softmax ``p [N, P, C]`` and per-position Hessian scale ``β [N, P]``.

    The loss at one position is ``-Σ_c a_c log p_c`` for some target-dependent weights
    ``a_c`` (class weight, label smoothing), whose Hessian w.r.t. the logits is
    ``(Σ_c a_c) (diag p − p pᵀ)``; ``β = Σ_c a_c / denominator``.
    """
    name = _name(loss_fn)
    f = output.detach()
    c = f.shape[1]
    probs = _ce_canonical(f, n).softmax(-1)
    eps = float(loss_fn.label_smoothing)
    weight = (
        torch.ones(c, dtype=f.dtype, device=f.device)
        if loss_fn.weight is None
        else loss_fn.weight.detach().to(f.dtype)
    )
    if _ce_class_indices(f, target):
        tgt = target.detach().reshape(n, -1)
        valid = tgt != loss_fn.ignore_index
        w_target = weight[torch.where(valid, tgt, 0)]
        coef = ((1 - eps) * w_target + (eps / c) * weight.sum()) * valid
    else:
        tgt = _ce_canonical(target.detach().to(f.dtype), n)
        smoothed = tgt * (1 - eps) + eps / c
        coef = (smoothed * weight).sum(-1)
    denom = _ce_denominator(loss_fn, f, target.detach())
    beta = torch.where(denom > 0, coef / denom, torch.zeros_like(coef))
    beta = _clamp_nonnegative(beta, name, "cross-entropy curvature scale")
    return probs, beta


def _ce_sqrt(
    loss_fn: nn.CrossEntropyLoss,
    output: Tensor,
    target: Tensor,
    n: int,
    mc_samples: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    probs, beta = _ce_probs_and_beta(loss_fn, output, target, n)
    _, p, c = probs.shape
    sqrt_beta = beta.sqrt()[..., None, None]
    if mc_samples is None:
        # column c' of S = √β (diag √p − p √pᵀ) is √β √p_c' (e_c' − p)
        eye = torch.eye(c, dtype=probs.dtype, device=probs.device)
        blocks = sqrt_beta * probs.sqrt()[..., :, None] * (eye - probs[..., None, :])
        cols = probs.new_zeros(p, c, n, p, c)  # (position, class) x [N, P, C]
        idx = torch.arange(p, device=probs.device)
        cols[idx, :, :, idx, :] = blocks.permute(1, 2, 0, 3)
        cols = cols.reshape(p * c, n, p, c)
    else:
        m = int(mc_samples)
        draws = torch.multinomial(probs.reshape(-1, c), m, replacement=True, generator=generator)
        onehot = F.one_hot(draws, c).to(probs.dtype).reshape(n, p, m, c)
        cols = sqrt_beta * (probs[:, :, None, :] - onehot) / math.sqrt(m)
        cols = cols.permute(2, 0, 1, 3)
    return _ce_from_canonical(cols, output.shape)


# ----------------------------------------------------------------------------------------
# MSE and BCE with logits (elementwise, diagonal Hessian)
# ----------------------------------------------------------------------------------------


def _diag_sqrt(sqrt_coef: Tensor, output_shape: torch.Size, n: int) -> Tensor:
    """Exact columns for a diagonal Hessian: one one-hot column per element of a sample."""
    coef = sqrt_coef.expand(output_shape).reshape(n, -1)
    q = coef.shape[1]
    return torch.diag_embed(coef).permute(2, 0, 1).reshape(q, *output_shape)


def _mse_scale(loss_fn: nn.MSELoss, output: Tensor) -> float:
    """Hessian coefficient ``2·norm`` of torch's MSELoss (``norm = 1/numel`` for mean)."""
    return 2.0 / output.numel() if loss_fn.reduction == "mean" else 2.0


def _mse_sqrt(
    loss_fn: nn.MSELoss,
    output: Tensor,
    target: Tensor,
    n: int,
    mc_samples: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    _target_like(output, target, _name(loss_fn))
    scale = math.sqrt(_mse_scale(loss_fn, output))
    if mc_samples is None:
        ones = torch.full((), scale, dtype=output.dtype, device=output.device)
        return _diag_sqrt(ones, output.shape, n)
    m = int(mc_samples)
    eps = torch.randn(
        (m, *output.shape), dtype=output.dtype, device=output.device, generator=generator
    )
    return eps * (scale / math.sqrt(m))


def _bce_factors(
    loss_fn: nn.BCEWithLogitsLoss, output: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """Return ``σ(f)`` and ``κ = w·(1 + (p_c − 1)·y)·norm`` (both of the output's shape).

    Per element, torch's loss is ``−w [p_c y log σ(f) + (1 − y) log(1 − σ(f))]``; its second
    derivative is ``w (1 + (p_c − 1) y) σ(f)(1 − σ(f))``, so the Hessian coefficient of the
    batch loss is ``κ σ(1 − σ)``.
    """
    name = _name(loss_fn)
    f = output.detach()
    y = _target_like(f, target, name)
    kappa = torch.ones_like(f)
    if loss_fn.pos_weight is not None:
        kappa = kappa + (loss_fn.pos_weight.detach().to(f.dtype) - 1) * y
    if loss_fn.weight is not None:
        kappa = kappa * loss_fn.weight.detach().to(f.dtype)
    if kappa.shape != f.shape:
        raise ValueError(
            f"{name}: weight/pos_weight broadcast the output {tuple(f.shape)} to "
            f"{tuple(kappa.shape)}; not supported."
        )
    if loss_fn.reduction == "mean":
        kappa = kappa / f.numel()
    kappa = _clamp_nonnegative(kappa, name, "BCE curvature coefficient")
    return torch.sigmoid(f), kappa


def _bce_sqrt(
    loss_fn: nn.BCEWithLogitsLoss,
    output: Tensor,
    target: Tensor,
    n: int,
    mc_samples: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    sigma, kappa = _bce_factors(loss_fn, output, target)
    if mc_samples is None:
        return _diag_sqrt((kappa * sigma * (1 - sigma)).sqrt(), output.shape, n)
    m = int(mc_samples)
    draws = torch.bernoulli(sigma.expand(m, *sigma.shape), generator=generator)
    return kappa.sqrt() * (sigma - draws) / math.sqrt(m)


# ----------------------------------------------------------------------------------------
# generic separable losses
# ----------------------------------------------------------------------------------------


def _hvp_batched(fn: Callable[[Tensor], Tensor], f: Tensor, vs: Tensor, name: str) -> Tensor:
    """Hessian-vector products ``H v`` of scalar ``fn`` at ``f`` for each ``v`` in ``vs``.

    Uses ``torch.func`` (reverse-over-reverse: the vector-Jacobian product of the gradient,
    vmapped over ``vs``; the Hessian is symmetric); falls back, with a warning, to a loop of
    double-backward products when the loss does not support ``torch.func`` transforms.
    """
    try:
        _, vjp_fn = torch.func.vjp(torch.func.grad(fn), f)
        return torch.func.vmap(vjp_fn)(vs)[0]
    except Exception as err:  # any torch.func incompatibility of the loss
        warnings.warn(
            f"{name}: torch.func Hessian-vector products failed ({type(err).__name__}: "
            f"{err}); falling back to double backward, one product at a time.",
            RuntimeWarning,
            stacklevel=4,
        )
    with torch.enable_grad():
        x = f.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x), x, create_graph=True)
        if not grad.requires_grad:  # the loss is linear in the output
            return torch.zeros_like(vs)
        out = [torch.autograd.grad(grad, x, v, retain_graph=True, allow_unused=True)[0] for v in vs]
    return torch.stack([torch.zeros_like(f) if o is None else o for o in out]).detach()


def _generic_blocks(loss_fn: Callable, output: Tensor, target: Tensor, n: int) -> Tensor:
    """Per-sample Hessian blocks ``[N, Q, Q]`` of the batch loss (``Q`` = elements/sample).

    Column ``j`` of every block comes from one Hessian-vector product with the one-hot
    vector set at coordinate ``j`` of *every* sample (exact for a loss separable over the
    batch). One extra product with a random vector checks separability and warns if the
    Hessian couples different samples.
    """
    name = _name(loss_fn)
    f = output.detach()
    tgt = target.detach() if isinstance(target, Tensor) else target
    q = f.numel() // n

    def fn(x: Tensor) -> Tensor:
        return loss_fn(x, tgt)

    eye = torch.eye(q, dtype=f.dtype, device=f.device)
    # a private generator: the check must not advance the user's global RNG
    probe_gen = torch.Generator(device=f.device).manual_seed(0)
    probe = torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=probe_gen)
    vs = torch.cat([eye[:, None, :].expand(q, n, q).reshape(q, *f.shape), probe[None]])
    hv = _hvp_batched(fn, f, vs, name)
    blocks = hv[:q].reshape(q, n, q).permute(1, 2, 0)  # [n, row, col]
    blocks = (blocks + blocks.transpose(1, 2)) / 2
    expected = torch.einsum("nij,nj->ni", blocks, probe.reshape(n, q))
    got = hv[q].reshape(n, q)
    tol = math.sqrt(torch.finfo(f.dtype).eps) * (1 + expected.abs().max().item())
    if (got - expected).abs().max().item() > tol:
        warnings.warn(
            f"{name}: the loss couples different samples (its Hessian w.r.t. the output is "
            "not block-diagonal over the batch); the per-sample curvature is wrong for it.",
            RuntimeWarning,
            stacklevel=3,
        )
    return blocks


def _psd_factor(blocks: Tensor, name: str) -> Tensor:
    """Factor symmetric blocks ``H_n = S_n S_nᵀ`` by eigendecomposition; ``S_n = U √λ``.

    Eigenvalues with ``|λ| ≤ √eps · max|λ|`` that are negative are round-off and clamped to
    zero (with a warning); clearly negative ones mean the loss is not convex in the outputs:
    the GGN is then not positive semi-definite, and their part is dropped (with a warning).
    """
    evals, evecs = torch.linalg.eigh(blocks)
    scale = evals.abs().amax(-1, keepdim=True)
    tol = math.sqrt(torch.finfo(blocks.dtype).eps) * scale
    negative = evals < 0
    if bool((negative & (evals < -tol)).any()):
        warnings.warn(
            f"{name}: the loss Hessian w.r.t. the outputs is indefinite (the loss is not "
            "convex in the outputs), so the GGN is not positive semi-definite; the negative "
            "eigenvalues are dropped.",
            RuntimeWarning,
            stacklevel=3,
        )
    elif bool(negative.any()):
        warnings.warn(
            f"{name}: tiny negative eigenvalues of the loss Hessian (round-off) clamped to 0.",
            RuntimeWarning,
            stacklevel=3,
        )
    return evecs * evals.clamp(min=0).sqrt()[:, None, :]


def _generic_sqrt(
    loss_fn: Callable,
    output: Tensor,
    target: Tensor,
    n: int,
    mc_samples: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    sqrt = _psd_factor(_generic_blocks(loss_fn, output, target, n), _name(loss_fn))
    q = sqrt.shape[1]
    if mc_samples is None:
        return sqrt.permute(2, 0, 1).reshape(q, *output.shape)
    m = int(mc_samples)
    signs = torch.randint(0, 2, (m, n, q), generator=generator, device=output.device)
    signs = signs.to(output.dtype) * 2 - 1
    cols = torch.einsum("nqk,mnk->mnq", sqrt, signs) / math.sqrt(m)
    return cols.reshape(m, *output.shape)


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------


def hessian_sqrt(
    loss_fn: Callable,
    output: Tensor,
    target: Tensor,
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Square-root columns of the per-sample output Hessian of the batch loss.

    Returns ``S`` of shape ``[K, *output.shape]`` (detached, output's dtype and device) with
    ``Σ_k vec(S_k[n]) vec(S_k[n])ᵀ = ∂²L/∂f_n∂f_n`` for every sample ``n`` (exactly, or in
    expectation for Monte-Carlo), where ``L = loss_fn(output, target)`` including the
    normalization of its reduction.

    Exact columns (``mc_samples=None``) never mix positions that the loss treats
    independently; each is nonzero at one position per sample:

    * ``nn.CrossEntropyLoss`` (``p = softmax``; class weights, ``ignore_index``, label
      smoothing, probability targets): per position ``β (diag p − p pᵀ)`` factored as
      ``√β (diag √p − p √pᵀ)``; ``K = C · positions per sample`` (positions: the extra dims of
      ``[N, C, d1, ...]`` times the rows per sample of the flattened layout).
    * ``nn.MSELoss``: ``2·norm·I`` with ``norm = 1/numel`` (mean) or 1 (sum); one scaled
      one-hot column per output element of a sample.
    * ``nn.BCEWithLogitsLoss``: diagonal ``w (1 + (pos_weight − 1) y) σ(1 − σ) · norm``; one
      scaled one-hot column per element.
    * generic losses (assumed separable over the batch): dense per-sample block via
      ``torch.func`` Hessian-vector products, factored ``U √λ`` by ``torch.linalg.eigh``;
      ``K`` = elements per sample. Round-off negative eigenvalues (``|λ| ≤ √eps·max|λ|``)
      are clamped to 0 with a warning; clearly negative ones (loss not convex in the
      outputs, GGN not positive semi-definite) are dropped with a warning naming the module.

    Monte-Carlo columns (``K = mc_samples = M``, all positions at once, sampled with
    ``generator``), each unbiased for the exact block:

    * cross-entropy: ``√β (p − onehot(ŷ)) / √M`` with ``ŷ ~ Categorical(p)`` per position;
    * MSE: Gaussian ``√(2·norm) ε / √M``, ``ε ~ N(0, I)``;
    * BCE: ``√(w (1 + (pos_weight − 1) y) · norm) (σ − ŷ) / √M`` with ``ŷ ~ Bernoulli(σ)``
      per element (``E[(σ − ŷ)²] = σ(1 − σ)``; up to the constant ``√(w·norm)``, ``σ − ŷ``
      is the gradient of the loss at the sampled label; with ``pos_weight`` the exact
      coefficient depends on the real target ``y``, which the factor carries);
    * generic: ``S_n ε / √M`` with Rademacher ``ε`` (needs the exact factor first).

    Exact columns cost ``K × output.numel()`` memory; use Monte-Carlo for large outputs.

    Args:
        loss_fn: The loss module, called as ``loss_fn(output, target)``.
        output: The model output fed to the loss, ``[rows, ...]``.
        target: The target fed to the loss.
        mc_samples: ``None`` for the exact square root, else the number ``M`` of
            Monte-Carlo columns.
        generator: Random generator for Monte-Carlo sampling (on the output's device).
        batch_size: Number of samples ``N`` when the output's rows are ``N·T`` flattened
            per-sample rows (language-model layout); default ``output.shape[0]``.

    Returns:
        The columns ``S``, shape ``[K, *output.shape]``.

    Raises:
        ValueError: For unsupported settings (see :func:`classify`), mismatched shapes, or
            ``batch_size`` not dividing the output's rows.

    Example:
        The columns reproduce the per-sample block of the output Hessian:

        >>> import torch
        >>> from torch.func import hessian
        >>> from cockpit.losses import hessian_sqrt
        >>> _ = torch.manual_seed(0)
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> f, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2])  # [N, C]
        >>> s = hessian_sqrt(loss_fn, f, y)  # [K, N, C] with K = C
        >>> s.shape
        torch.Size([3, 4, 3])
        >>> block = torch.einsum("ki,kj->ij", s[:, 0], s[:, 0])  # Σ_k S_k[0] S_k[0]ᵀ
        >>> h = hessian(lambda f: loss_fn(f, y))(f)  # [N, C, N, C]
        >>> torch.allclose(block, h[0, :, 0, :])
        True
        >>> gen = torch.Generator().manual_seed(0)
        >>> mc = hessian_sqrt(loss_fn, f, y, mc_samples=2, generator=gen)
        >>> mc.shape  # [M, N, C], unbiased for the same block
        torch.Size([2, 4, 3])

    """
    info = classify(loss_fn)
    _check_mc(mc_samples)
    n = _num_samples(output, batch_size, info.name)
    if info.kind == "ce":
        _ce_check(loss_fn, output, target)
    impl = {"ce": _ce_sqrt, "mse": _mse_sqrt, "bce": _bce_sqrt}.get(info.kind, _generic_sqrt)
    with torch.no_grad():
        return impl(loss_fn, output.detach(), target, n, mc_samples, generator)


def individual_losses(
    loss_fn: Callable, output: Tensor, target: Tensor, batch_size: int | None = None
) -> Tensor:
    """Per-sample losses ``l_n`` (detached, shape ``[N]``) that reproduce the batch loss.

    ``L = (1/N) Σ_n l_n`` for mean-type reductions and ``L = Σ_n l_n`` for ``"sum"``, with
    ``l_n = N · (sample n's share of L)`` in the mean case. That share absorbs
    non-uniform normalizations: cross-entropy with class weights and/or ``ignore_index``
    divides by the summed weights of the non-ignored targets, ``nn.KLDivLoss``'s
    ``"batchmean"`` by the number of output rows, other means by the number of elements.

    Generic losses are evaluated through a shallow copy with ``reduction="none"`` whose
    elementwise terms are summed per sample; the result is checked against
    ``loss_fn(output, target)``.

    Args:
        loss_fn: The loss module, called as ``loss_fn(output, target)``.
        output: The model output fed to the loss, ``[rows, ...]``.
        target: The target fed to the loss.
        batch_size: Number of samples ``N`` when the rows are ``N·T`` flattened per-sample
            rows; default ``output.shape[0]``.

    Returns:
        The per-sample losses, shape ``[N]``.

    Raises:
        ValueError: For unsupported settings, a generic callable without a ``reduction``
            attribute, or a generic module whose unreduced copy does not reproduce its loss.

    Example:
        Class weights make the mean non-uniform; the individual losses still average to ``L``:

        >>> import torch
        >>> from cockpit.losses import individual_losses
        >>> _ = torch.manual_seed(0)
        >>> loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]).double())
        >>> f, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2])  # [N, C]
        >>> l = individual_losses(loss_fn, f, y)  # [N]
        >>> l.shape, torch.allclose(l.mean(), loss_fn(f, y))
        (torch.Size([4]), True)

        The flattened language-model layout: ``[N·T, C]`` rows, ``T = 2`` per sample:

        >>> l = individual_losses(loss_fn, f, y, batch_size=2)  # [N] with N = 2
        >>> l.shape, torch.allclose(l.mean(), loss_fn(f, y))
        (torch.Size([2]), True)

    """
    info = classify(loss_fn)
    n = _num_samples(output, batch_size, info.name)
    f = output.detach()
    tgt = target.detach() if isinstance(target, Tensor) else target
    with torch.no_grad():
        if info.kind == "ce":
            _ce_check(loss_fn, f, tgt)
            unreduced = F.cross_entropy(
                f,
                tgt,
                weight=loss_fn.weight,
                ignore_index=loss_fn.ignore_index,
                reduction="none",
                label_smoothing=loss_fn.label_smoothing,
            )
            denom = _ce_denominator(loss_fn, f, tgt)
        elif info.kind == "mse":
            unreduced = F.mse_loss(f, _target_like(f, tgt, info.name), reduction="none")
            denom = unreduced.numel()
        elif info.kind == "bce":
            unreduced = F.binary_cross_entropy_with_logits(
                f,
                _target_like(f, tgt, info.name),
                weight=loss_fn.weight,
                pos_weight=loss_fn.pos_weight,
                reduction="none",
            )
            if unreduced.shape != f.shape:
                raise ValueError(f"{info.name}: weight/pos_weight broadcast the output.")
            denom = unreduced.numel()
        else:
            unreduced, denom = _generic_unreduced(loss_fn, info, f, tgt)
        shares = _group_sum(unreduced, n)
        return shares * (n / denom) if info.reduction == "mean" else shares


def _generic_unreduced(
    loss_fn: Callable, info: LossInfo, f: Tensor, target: Tensor
) -> tuple[Tensor, float]:
    """Unreduced terms ``[rows, ...]`` of a generic loss and its mean's denominator."""
    if info.reduction is None:
        raise ValueError(
            f"{info.name} has no 'reduction' attribute; per-sample losses need a loss "
            "module with reduction='mean' or 'sum'."
        )
    raw = loss_fn.reduction
    unreduced_fn = copy.copy(loss_fn)
    unreduced_fn.reduction = "none"
    unreduced = unreduced_fn(f, target)
    if unreduced.dim() == 0 or unreduced.shape[0] != f.shape[0]:
        raise ValueError(
            f"{info.name} with reduction='none' returned shape {tuple(unreduced.shape)}; "
            f"expected one leading row per output row ({f.shape[0]})."
        )
    denom = {"mean": unreduced.numel(), "batchmean": f.shape[0], "sum": 1}[raw]
    rebuilt = unreduced.sum() / denom
    loss = loss_fn(f, target)
    tol = 100 * torch.finfo(f.dtype).eps * (unreduced.abs().sum() / denom + 1)
    if not bool((rebuilt - loss).abs() <= tol):
        raise ValueError(
            f"{info.name}: its reduction='none' copy does not reproduce the batch loss "
            f"({rebuilt.item():.6g} vs {loss.item():.6g}); per-sample losses unavailable."
        )
    return unreduced, denom
