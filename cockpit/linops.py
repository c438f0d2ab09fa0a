"""Hessian-vector products and the estimators built on them (curvlinops style).

:class:`HessianOperator` is the mini-batch Hessian of a scalar loss ``L(θ)`` as a
linear operator on flat parameter vectors. It re-evaluates the loss on its own (from a
closure ``θ -> L``), differentiates once with ``create_graph=True`` through
``torch.autograd.grad`` (never ``.backward``, so no parameter ↔ gradient reference
cycle and ``p.grad`` is never touched), keeps that gradient graph for its own lifetime
and answers each product with one double-backward pass; ``matmat`` batches the products
with ``is_grads_batched``. Nothing outlives the operator: drop it and the graph is freed.
:meth:`cockpit.engine.Engine.hessian_operator` builds one for the last recorded step
(same inputs, targets and dropout masks).

The estimators are plain functions of anything with ``shape`` and ``@`` (a
:class:`LinearOperator`, or a square ``torch.Tensor``):

- :func:`hutchinson_trace` — ``tr(A) ≈ (1/K) Σ_k v_kᵀ A v_k`` with Rademacher ``v_k``;
- :func:`hutchinson_diagonal` — ``diag(A) ≈ (1/K) Σ_k v_k ⊙ A v_k``;
- :func:`lanczos` — the largest-magnitude eigenpairs by Lanczos with full
  reorthogonalization, an error tolerance, an iteration cap, a convergence flag and a
  warm start (e.g. the previous step's eigenvector).

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> op = HessianOperator.from_model(model, torch.nn.CrossEntropyLoss(), (x,), y)
    >>> op.shape
    (26, 26)
    >>> dense = op @ torch.eye(26)  # the full Hessian, one product per column
    >>> bool(torch.allclose(dense, dense.T, atol=1e-5))
    True
    >>> result = lanczos(op, k=1, tol=1e-6)
    >>> result.converged, bool(torch.isclose(result.eigenvalues[0],
    ...     torch.linalg.eigvalsh(dense).abs().max(), rtol=1e-4))
    (True, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "LinearOperator",
    "HessianOperator",
    "hutchinson_trace",
    "hutchinson_diagonal",
    "lanczos",
    "LanczosResult",
    "twice_differentiable",
]


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Use kernels that support double backward where torch has alternatives.

    Fused scaled-dot-product attention kernels (flash, memory-efficient) have no
    derivative of their backward pass; inside this context attention uses the math
    implementation, so Hessian-vector products through ``nn.MultiheadAttention`` and
    transformer layers work. :meth:`HessianOperator.from_model` uses it already; wrap
    your own loss closures in it.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from cockpit.linops import HessianOperator, twice_differentiable
        >>> _ = torch.manual_seed(0)
        >>> q = torch.randn(2, 1, 4, 3, dtype=torch.float64)  # [N, heads, S, D]
        >>> def loss(p):
        ...     with twice_differentiable():
        ...         out = F.scaled_dot_product_attention(q @ p["w"], q, q)  # [N, heads, S, D]
        ...     return out.pow(2).sum()
        >>> op = HessianOperator(loss, {"w": torch.eye(3, dtype=torch.float64)})
        >>> hess = op @ torch.eye(9, dtype=torch.float64)  # [D, D], D = 9
        >>> hess.shape, torch.allclose(hess, hess.T)
        (torch.Size([9, 9]), True)
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class LinearOperator:
    """A square linear operator on flat vectors: ``op @ v`` for ``v [D]`` or ``V [D, K]``.

    Subclasses implement :meth:`_matmat` (``[D, K] -> [D, K]``) and set ``shape``,
    ``dtype`` and ``device``.

    Example:
        A diagonal operator, usable by every estimator here:

        >>> import torch
        >>> from cockpit.linops import LinearOperator, hutchinson_trace
        >>> class Diagonal(LinearOperator):
        ...     def __init__(self, d):
        ...         self.d, self.shape = d, (len(d), len(d))
        ...         self.dtype, self.device = d.dtype, d.device
        ...     def _matmat(self, mat):  # [D, K] -> [D, K]
        ...         return self.d[:, None] * mat
        >>> op = Diagonal(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> (op @ torch.ones(3, dtype=torch.float64)).tolist()
        [1.0, 2.0, 3.0]
        >>> float(hutchinson_trace(op, num_probes=4))  # exact: Rademacher vᵀ D v = tr D
        6.0
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def _matmat(self, mat: Tensor) -> Tensor:
        raise NotImplementedError

    def __matmul__(self, x: Tensor) -> Tensor:
        """Apply the operator to a vector ``[D]`` or the columns of a matrix ``[D, K]``."""
        if x.dim() == 1:
            return self._matmat(x[:, None])[:, 0]
        if x.dim() == 2:
            return self._matmat(x)
        raise ValueError(f"expected a vector [D] or a matrix [D, K], got shape {tuple(x.shape)}")


class HessianOperator(LinearOperator):
    """The Hessian ``∇²L(θ)`` of a scalar loss as a linear operator on flat parameter vectors.

    Flat vectors concatenate the parameters in the order of ``params`` (see
    :meth:`flatten` / :meth:`unflatten`). The gradient graph is built on the first
    product and reused by all later ones; the parameters must not change in place
    meanwhile (e.g. ``optimizer.step()``): the operator checks their version counters
    and raises, so build a new operator for new parameters.

    Args:
        loss: ``loss(params) -> L``, evaluating the scalar loss with the given tensors in
            place of the parameters (e.g. via ``torch.func.functional_call``).
        params: ``{name: tensor}`` at which to evaluate the Hessian (detached internally;
            their values are not copied).
        batched: Apply ``matmat`` columns in one batched double-backward pass
            (``is_grads_batched``); falls back to a loop, with a warning, where the graph
            does not support it.

    Example:
        For least squares ``L = ‖X w − y‖²`` the Hessian is ``2 XᵀX``:

        >>> import torch
        >>> from cockpit.linops import HessianOperator
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> x, y = torch.randn(5, 3).double(), torch.randn(5, 1).double()  # [N, D_in], [N, 1]
        >>> loss_fn = torch.nn.MSELoss(reduction="sum")
        >>> op = HessianOperator.from_model(model, loss_fn, (x,), y)
        >>> op.shape, op.names
        ((3, 3), ['weight'])
        >>> torch.allclose(op @ torch.eye(3, dtype=torch.float64), 2 * x.T @ x)
        True
        >>> torch.allclose(op.loss_value, loss_fn(model(x), y))
        True

        Vectors are flat; ``flatten``/``unflatten`` convert to and from ``{name: [*P]}``:

        >>> v = op.flatten({"weight": torch.ones(1, 3, dtype=torch.float64)})  # [D]
        >>> hv = op.unflatten(op @ v)
        >>> hv["weight"].shape
        torch.Size([1, 3])
    """

    def __init__(
        self,
        loss: Callable[[dict[str, Tensor]], Tensor],
        params: Mapping[str, Tensor],
        *,
        batched: bool = True,
    ) -> None:
        if not params:
            raise ValueError("HessianOperator needs at least one parameter")
        self._loss = loss
        self._params = {k: p.detach() for k, p in params.items()}
        self._versions = {k: p._version for k, p in self._params.items()}
        self.names = list(self._params)
        self.shapes = [p.shape for p in self._params.values()]
        self._numels = [p.numel() for p in self._params.values()]
        d = sum(self._numels)
        self.shape = (d, d)
        first = next(iter(self._params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.batched = batched
        self._leaves: list[Tensor] | None = None
        self._grads: list[Tensor] | None = None
        self._loss_value: Tensor | None = None

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Sequence,
        target: Tensor,
        params: Mapping[str, Tensor] | None = None,
    ) -> HessianOperator:
        """The Hessian of ``loss_fn(model(*inputs), target)`` w.r.t. the trainable parameters.

        Buffers are passed as copies, so BatchNorm running statistics are not updated.

        Args:
            model: The model.
            loss_fn: The loss, called as ``loss_fn(output, target)``.
            inputs: Positional model inputs.
            target: The target.
            params: ``{name: tensor}``; default: all parameters with ``requires_grad``.

        Returns:
            The operator, ``[D, D]`` with D the number of entries of ``params``.
        """
        if params is None:
            params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        buffers = {k: b.clone() for k, b in model.named_buffers()}

        def loss(p: dict[str, Tensor]) -> Tensor:
            with twice_differentiable():
                out = torch.func.functional_call(model, {**buffers, **p}, tuple(inputs))
                return loss_fn(out, target)

        return cls(loss, params)

    # ----------------------------------------------------------------- layout
    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate tensors ``[*P]`` (or ``[*P, K]``) into ``[D]`` (or ``[D, K]``)."""
        parts = [tensors[k] for k in self.names] if isinstance(tensors, Mapping) else tensors
        extra = parts[0].shape[len(self.shapes[0]) :]
        return torch.cat([t.reshape(-1, *extra) for t in parts])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split ``[D]`` (or ``[D, K]``) into ``{name: [*P]}`` (or ``[*P, K]``)."""
        extra = vec.shape[1:]
        chunks = torch.split(vec, self._numels)
        return {
            k: c.reshape(*s, *extra)
            for k, c, s in zip(self.names, chunks, self.shapes, strict=True)
        }

    # ---------------------------------------------------------------- products
    def _check_versions(self) -> None:
        changed = [k for k, p in self._params.items() if p._version != self._versions[k]]
        if changed:
            raise RuntimeError(
                f"parameters {changed[:3]} were modified in place since this HessianOperator "
                "was built (e.g. by optimizer.step()); build a new operator for the new values"
            )

    def _build(self) -> None:
        self._check_versions()
        leaves = [p.requires_grad_(True) for p in (q.detach() for q in self._params.values())]
        with torch.enable_grad():
            loss = self._loss(dict(zip(self.names, leaves, strict=True)))
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    "the loss closure must return a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}"
                )
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        self._loss_value = loss.detach()
        self._leaves = leaves
        self._grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)
        ]

    @property
    def loss_value(self) -> Tensor:
        """The loss at the parameters (evaluates it on first use)."""
        if self._loss_value is None:
            self._build()
        assert self._loss_value is not None
        return self._loss_value

    def _matmat(self, mat: Tensor) -> Tensor:
        if mat.shape[0] != self.shape[0]:
            raise ValueError(f"expected {self.shape[0]} rows, got {mat.shape[0]}")
        if self._grads is None:
            self._build()
        else:
            self._check_versions()
        assert self._grads is not None and self._leaves is not None
        mat = mat.to(self.dtype)
        k = mat.shape[1]
        live = [i for i, g in enumerate(self._grads) if g.requires_grad]
        out = mat.new_zeros(self.shape[0], k)
        if not live:  # the loss is linear in every parameter
            return out
        parts = [
            c.T.reshape(k, *s)
            for c, s in zip(torch.split(mat, self._numels), self.shapes, strict=True)
        ]
        outputs = [self._grads[i] for i in live]
        cotangents = [parts[i] for i in live]
        hv: Sequence[Tensor | None] | None = None
        if self.batched and k > 1:
            try:
                hv = torch.autograd.grad(
                    outputs,
                    self._leaves,
                    cotangents,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            except RuntimeError as err:
                warnings.warn(
                    f"batched Hessian-vector products failed ({err}); looping over the columns",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.batched = False
        if hv is None:
            cols = []
            for j in range(k):
                res = torch.autograd.grad(
                    outputs,
                    self._leaves,
                    [c[j] for c in cotangents],
                    retain_graph=True,
                    allow_unused=True,
                )
                cols.append([None if r is None else r[None] for r in res])
            hv = [
                None if cols[0][i] is None else torch.cat([c[i] for c in cols])  # type: ignore[misc]
                for i in range(len(self._leaves))
            ]
        blocks = [
            torch.zeros(k, n, dtype=mat.dtype, device=mat.device)
            if h is None
            else h.reshape(k, n).to(mat.dtype)
            for h, n in zip(hv, self._numels, strict=True)
        ]
        return torch.cat(blocks, 1).T


# ----------------------------------------------------------------------------------------
# estimators
# ----------------------------------------------------------------------------------------


def _rademacher(d: int, k: int, like: object, generator: torch.Generator | None) -> Tensor:
    dtype = getattr(like, "dtype", torch.get_default_dtype())
    device = getattr(like, "device", torch.device("cpu"))
    v = torch.randint(0, 2, (d, k), generator=generator, device=device)
    return v.to(dtype).mul_(2).sub_(1)


def _dim(op: object) -> int:
    shape = tuple(op.shape)  # type: ignore[attr-defined]
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"expected a square operator, got shape {shape}")
    return shape[0]


def _probe_batches(num_probes: int, batch_size: int) -> list[int]:
    if int(num_probes) != num_probes or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    sizes = [batch_size] * (num_probes // batch_size)
    if num_probes % batch_size:
        sizes.append(num_probes % batch_size)
    return sizes


def hutchinson_trace(
    op: LinearOperator | Tensor,
    num_probes: int,
    generator: torch.Generator | None = None,
    batch_size: int = 16,
) -> Tensor:
    """Hutchinson's unbiased trace estimate ``(1/K) Σ_k v_kᵀ A v_k`` (Rademacher ``v_k``).

    Its variance is ``(2/K) Σ_{i≠j} A_ij²`` for symmetric A: exact for diagonal matrices.

    Args:
        op: A square operator (``shape``, ``@``), e.g. :class:`HessianOperator` or a tensor.
        num_probes: Number of probes K (= matrix-vector products).
        generator: Random generator for the probes (on the operator's device).
        batch_size: Probes applied per ``op @ V`` call.

    Returns:
        The estimate (0-dim tensor).

    Example:
        >>> import torch
        >>> a = torch.diag(torch.tensor([1.0, 2.0, 3.0])) + 0.1
        >>> g = torch.Generator().manual_seed(0)
        >>> est = hutchinson_trace(a, 2000, g)
        >>> bool(abs(est - 6.3) < 0.05)
        True
    """
    d = _dim(op)
    total = None
    for k in _probe_batches(num_probes, batch_size):
        v = _rademacher(d, k, op, generator)
        s = (v * (op @ v)).sum()
        total = s if total is None else total + s
    assert total is not None
    return total / num_probes


def hutchinson_diagonal(
    op: LinearOperator | Tensor,
    num_probes: int,
    generator: torch.Generator | None = None,
    batch_size: int = 16,
) -> Tensor:
    """Hutchinson's unbiased diagonal estimate ``(1/K) Σ_k v_k ⊙ A v_k`` (Rademacher ``v_k``).

    Entry j has variance ``(1/K) Σ_{i≠j} A_ij²``.

    Args:
        op: A square operator (``shape``, ``@``).
        num_probes: Number of probes K.
        generator: Random generator for the probes.
        batch_size: Probes applied per ``op @ V`` call.

    Returns:
        The estimate ``[D]``.

    Example:
        >>> import torch
        >>> a = torch.tensor([[2.0, 0.5], [0.5, -1.0]])
        >>> g = torch.Generator().manual_seed(0)
        >>> hutchinson_diagonal(a, 4000, g).sub(a.diagonal()).abs().max() < 0.05
        tensor(True)
    """
    d = _dim(op)
    total = None
    for k in _probe_batches(num_probes, batch_size):
        v = _rademacher(d, k, op, generator)
        s = (v * (op @ v)).sum(1)
        total = s if total is None else total + s
    assert total is not None
    return total / num_probes


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos`.

    Attributes:
        eigenvalues: The k Ritz values of largest magnitude, ``[k]``, by decreasing magnitude.
        eigenvectors: Their unit Ritz vectors as columns, ``[D, k]``.
        converged: Whether every returned pair met the tolerance.
        num_matvecs: Operator applications used.

    Example:
        >>> import torch
        >>> from cockpit.linops import lanczos
        >>> a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))  # eigenvalues 1..10
        >>> res = lanczos(a, k=2, tol=1e-10, generator=torch.Generator().manual_seed(0))
        >>> res.eigenvalues.round(decimals=8).tolist(), res.eigenvectors.shape  # [k], [D, k]
        ([10.0, 9.0], torch.Size([10, 2]))
        >>> res.converged, res.num_matvecs <= 10
        (True, True)
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    converged: bool
    num_matvecs: int


def lanczos(
    op: LinearOperator | Tensor,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LanczosResult:
    """Largest-magnitude eigenpairs of a symmetric operator by Lanczos iteration.

    Builds a Krylov basis with full reorthogonalization (twice, classical Gram-Schmidt)
    and stops once every one of the k Ritz values of largest magnitude ``θ_i`` has the
    residual norm ``r_i = ‖A y_i − θ_i y_i‖ = β_m |s_{m,i}| ≤ tol·|θ_i|`` (an
    eigenvalue of A lies within ``r_i`` of ``θ_i``: Saad, *Numerical Methods for Large
    Eigenvalue Problems*, 2011, §4.3), or when the Krylov space is invariant (then the
    pairs are exact). The sharper ``r_i²/gap_i`` estimate is *not* used: with the gap
    taken between Ritz values it is no bound while nearby eigenvalues are unresolved,
    and a warm start stopped after 4 products 3e-3 below the true top eigenvalue
    (0.845 vs a second eigenvalue of 0.794) while claiming 1e-3. Far fewer products
    than power iteration for the same accuracy, since Lanczos converges with the square
    root of the power method's rate.

    Args:
        op: A symmetric operator (``shape``, ``@``), e.g. :class:`HessianOperator`.
        k: Number of eigenpairs.
        tol: Relative error tolerance of the eigenvalues.
        max_iter: Cap on the number of products (Krylov dimension); at most D.
        v0: Warm start ``[D]`` (e.g. the previous step's eigenvector) or ``[D, j]``
            (their columns are summed); a random start when None.
        generator: Random generator for the start vector (and restarts).

    Returns:
        A :class:`LanczosResult` ``(eigenvalues, eigenvectors, converged, num_matvecs)``.

    Example:
        >>> import torch
        >>> a = torch.diag(torch.tensor([-5.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        >>> res = lanczos(a, k=2, tol=1e-8, generator=torch.Generator().manual_seed(0))
        >>> [round(v, 8) for v in res.eigenvalues.tolist()], res.converged
        ([-5.0, 4.0], True)
        >>> warm = lanczos(a, k=1, tol=1e-8, v0=res.eigenvectors[:, 0])
        >>> warm.num_matvecs
        1
    """
    d = _dim(op)
    if int(k) != k or not 1 <= k <= d:
        raise ValueError(f"k must be an integer in [1, {d}], got {k!r}")
    if max_iter < k:
        raise ValueError(f"max_iter ({max_iter}) must be at least k ({k})")
    max_iter = min(int(max_iter), d)
    dtype = getattr(op, "dtype", torch.get_default_dtype())
    device = getattr(op, "device", torch.device("cpu"))
    if v0 is None:
        q = torch.randn(d, generator=generator, device=device, dtype=dtype)
    else:
        q = v0.to(device=device, dtype=dtype)
        q = q.sum(1) if q.dim() == 2 else q.reshape(-1).clone()
        if q.shape[0] != d:
            raise ValueError(f"v0 has {q.shape[0]} entries, the operator {d}")
        if not bool(q.norm() > 0) or not bool(torch.isfinite(q).all()):
            q = torch.randn(d, generator=generator, device=device, dtype=dtype)
    q = q / q.norm()
    basis = torch.empty(d, max_iter, dtype=dtype, device=device)
    basis[:, 0] = q
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(dtype).eps
    scale = 0.0
    matvecs = 0
    converged = False
    theta = s = idx = None
    for j in range(max_iter):
        w = op @ basis[:, j]
        matvecs += 1
        alpha = float(torch.dot(w, basis[:, j]))
        alphas.append(alpha)
        qb = basis[:, : j + 1]
        for _ in range(2):  # full reorthogonalization, twice is enough
            w = w - qb @ (qb.T @ w)
        beta = float(w.norm())
        scale = max(scale, abs(alpha), beta)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 0:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        if j + 1 >= k:
            idx = torch.argsort(theta.abs(), descending=True)[:k]
            invariant = beta <= 10 * eps * max(scale, 1e-300) * math.sqrt(d)
            if invariant:
                converged = True
                break
            resid = beta * s[-1, idx].abs()
            if bool((resid <= tol * theta[idx].abs()).all()):
                converged = True
                break
        if j + 1 == max_iter:
            break
        if beta <= 10 * eps * max(scale, 1e-300) * math.sqrt(d):
            # invariant subspace found before k Ritz values: restart orthogonally
            w = torch.randn(d, generator=generator, device=device, dtype=dtype)
            for _ in range(2):
                w = w - qb @ (qb.T @ w)
            beta_next, w = 0.0, w / w.norm()
        else:
            beta_next, w = beta, w / beta
        betas.append(beta_next)
        basis[:, j + 1] = w
    assert theta is not None and s is not None
    if idx is None:
        idx = torch.argsort(theta.abs(), descending=True)[:k]
    m = len(alphas)
    vecs = basis[:, :m] @ s[:, idx].to(dtype=dtype, device=device)
    vecs = vecs / vecs.norm(dim=0, keepdim=True)
    return LanczosResult(theta[idx].to(dtype=dtype, device=device), vecs, converged, matvecs)
