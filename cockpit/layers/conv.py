"""Convolutions: ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d``.

Stride, padding (incl. ``"same"`` and non-zero padding modes), dilation, groups and
optional bias are supported.

Convolutions reduce to the affine form by unfolding the input into patches:
``a [N, G, S, C_in/G·K]`` with S output positions and K kernel elements
(:class:`ConvFactor` unfolds only when a quantity needs it: projections are one
convolution, individual gradients one grouped weight-gradient convolution). A transposed
convolution is the adjoint of a convolution, so its weight gradient is the
convolution-weight gradient with the roles swapped: the patches come from the output
gradient and the "output gradient" is the input.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cockpit.factors as _factors
from cockpit.factors import AffineFactor, ColumnAffineFactor, DenseFactor, Factor, check_weights
from cockpit.layers import register_layer, scale_smaller
from cockpit.quantities import Projection, Quantity


def unfold(
    x: Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
) -> Tensor:
    """Patches of an N-d input: ``[N, C, *spatial]`` → ``[N, S, C·prod(kernel_size)]``.

    Columns are ordered like a flattened conv weight ``[C, k_1, ..., k_d]``.

    Example:
        >>> import torch
        >>> x = torch.arange(8.0).view(1, 2, 4)
        >>> unfold(x, (2,), (2,), (0,), (1,)).tolist()
        [[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]
    """
    d = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * d
        elif padding == "same":
            pads = []
            for k, dil in zip(reversed(kernel_size), reversed(dilation), strict=True):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = (0,) * d
        else:
            raise ValueError(f"unknown padding {padding!r}")
    if d == 2:
        # im2col: [N, C·K, S] contiguous, returned transposed (a view). Twice as fast
        # as copying the strided windows below (3C3D's conv3, N = 128: 4.0 vs 7.7 ms),
        # and the matmuls that read the patches take the transposed layout as it is.
        return F.unfold(x, kernel_size, dilation, padding, stride).transpose(1, 2)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    for i in range(d):
        x = x.unfold(2 + i, dilation[i] * (kernel_size[i] - 1) + 1, stride[i])
    if any(dil > 1 for dil in dilation):
        x = x[(...,) + tuple(slice(None, None, dil) for dil in dilation)]
    n, c = x.shape[:2]
    # [N, C, L_1..L_d, k_1..k_d] -> [N, L_1..L_d, C, k_1..k_d]
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    x = x.permute(perm)
    s = x.shape[1 : 1 + d].numel()
    return x.reshape(n, s, -1)


def _grouped(t: Tensor, groups: int) -> Tensor:
    """``[N, S, C·K]`` with group-major columns → ``[N, G, S, C/G·K]``."""
    n, s, _ = t.shape
    return t.reshape(n, s, groups, -1).transpose(1, 2)


def _channels_last(t: Tensor, groups: int) -> Tensor:
    """``[N, C, *spatial]`` → ``[N, G, S, C/G]``."""
    n, c = t.shape[:2]
    return t.reshape(n, groups, c // groups, -1).transpose(2, 3)


#: Output positions from which a convolution's per-sample weight gradients are built by
#: one grouped weight-gradient convolution (samples as groups) instead of unfolding the
#: input: the unfolded patches cost S·C·K memory per sample, while the grouped kernel is
#: slower than a batched matmul when S is small (measured on 3C3D / All-CNN-C shapes,
#: CPU, whole batches with the patches from ``F.unfold``: S = 36 (96→128, N = 128) 34 ms
#: grouped vs 24 ms, S = 64 (192→192, N = 32) 29 vs 22 ms, S = 144 (64→96, N = 128) 28–30
#: vs 37 ms; All-CNN-C's 1D histogram 1.58x → 1.50x a plain step with 100 instead of 64).
GROUPED_MIN_POSITIONS = 100


def _weight_grad(
    x: Tensor, weight_shape: tuple[int, ...], g: Tensor, stride, padding, dilation, groups: int
) -> Tensor:
    """The gradient of a convolution's weight: ``torch.nn.grad.conv{1,2,3}d_weight``.

    Those pass a stride-0 placeholder for the weight, which sends oneDNN down a slower
    path for the grouped per-sample kernel; with a contiguous (never read) placeholder
    the chunked per-sample gradients of 3C3D / All-CNN-C layers were 5–10 % faster, a
    whole batch up to 30 % (3C3D's second conv layer: 26.9 → 18.7 ms).
    """
    d = len(weight_shape) - 2
    return torch.ops.aten.convolution_backward(
        g,
        x,
        g.new_empty(weight_shape),
        None,
        stride,
        padding,
        dilation,
        False,
        [0] * d,
        groups,
        (False, True, False),
    )[1]


class ConvFactor(AffineFactor):
    """Per-sample weight gradients of a convolution, built without unfolding when cheaper.

    The affine form (``a`` = unfolded input patches, ``b`` = output gradient, both
    ``[N, G, S, ·]``) is built lazily, only for the quantities that need it (the Gram
    form of the batch L2 norm when S is small, curvature columns, merging uses).
    Projections are one convolution of the input with the direction (read off the
    per-sample gradients instead when another request builds them); individual
    gradients come from one grouped weight-gradient convolution with the samples as
    groups when the layer has at least :data:`GROUPED_MIN_POSITIONS` output positions
    (on the CPU; other devices unfold).

    Args:
        x: Layer input ``[N, C_in, *spatial]``, already padded if ``padding`` is 0 for
            a non-zero padding mode or asymmetric "same" padding.
        g: Output gradient ``[N, C_out, *out]``, already scaled.
        module: The convolution (kernel size, stride, dilation, groups).
        padding: Symmetric per-dimension zero padding applied by the convolution.

    Example:
        >>> import torch
        >>> from cockpit.quantities import BatchL2, Projection
        >>> _ = torch.manual_seed(0)
        >>> layer = torch.nn.Conv2d(16, 4, 3, padding=1).double()
        >>> x = torch.randn(2, 16, 8, 8, dtype=torch.float64)  # input [N, C_in, H, W]
        >>> g = torch.randn(2, 4, 8, 8, dtype=torch.float64)  # output gradient [N, C_out, H, W]
        >>> f = ConvFactor(x, g, layer, layer.padding)
        >>> f.s, f.groups  # S = 8·8 output positions
        (64, 1)
        >>> dense = f.to_dense()  # one grouped weight-gradient convolution, [N, *P]
        >>> dense.shape
        torch.Size([2, 4, 16, 3, 3])
        >>> f.a.shape, f.b.shape  # built on first use: [N, G, S, C_in·K], [N, G, S, C_out]
        (torch.Size([2, 1, 64, 144]), torch.Size([2, 1, 64, 4]))
        >>> torch.allclose(dense, AffineFactor(f.a, f.b, f.shape).to_dense())
        True
        >>> f.drop_cache()
        >>> torch.allclose(f.to_dense_rows(1, 3), dense[:, 1:3])  # output channels 1:3
        True
        >>> column = f.as_column()  # one curvature column: Σ_n G_n² without patches
        >>> torch.allclose(column.sum_of_squares(), (dense**2).sum(0))
        True
        >>> f.drop_cache()  # frees the patches (rebuilt when needed again)
        >>> "a" in vars(f)
        False
        >>> qs = [Projection("u"), BatchL2()]
        >>> u = {"u": torch.randn(4, 16, 3, 3, dtype=torch.float64)}  # a direction shaped like P
        >>> got = f.reduce(qs, layer.weight.detach(), u)  # the projection is one convolution
        >>> ref = DenseFactor(dense).reduce(qs, layer.weight.detach(), u)
        >>> all(torch.allclose(got[q], ref[q]) for q in qs)
        True
    """

    def __init__(self, x: Tensor, g: Tensor, module: nn.modules.conv._ConvNd, padding) -> None:
        self.x, self.g, self.padding = x, g, tuple(padding)
        self.kernel_size, self.stride = module.kernel_size, module.stride
        self.dilation = module.dilation
        self.n, self.groups, self.s = x.shape[0], module.groups, g.shape[2:].numel()
        self.shape = module.weight.shape

    @cached_property
    def a(self) -> Tensor:  # type: ignore[override]
        """Unfolded input patches ``[N, G, S, C_in/G·K]``."""
        a = unfold(self.x, self.kernel_size, self.stride, self.padding, self.dilation)
        return _grouped(a, self.groups)

    @cached_property
    def b(self) -> Tensor:  # type: ignore[override]
        """Output gradient ``[N, G, S, C_out/G]``."""
        return _channels_last(self.g, self.groups)

    @property
    def _dims(self) -> tuple[int, int]:
        return self.shape[0] // self.groups, self.shape[1:].numel()

    def _dtype(self) -> torch.dtype:
        return self.g.dtype

    def drop_cache(self) -> None:
        """Free the unfolded patches and the reshaped output gradient, if built."""
        self.__dict__.pop("a", None)
        self.__dict__.pop("b", None)

    def _grouped_kernel(self) -> bool:
        """Build per-sample gradients with the grouped weight-gradient convolution.

        On the CPU only: on CUDA, cuDNN's grouped kernel with the samples as groups was
        slower than unfolding the input and one batched matmul (workload B on an H100,
        ``python -m benchmarks.knob_probe``: batch L2 3.45x a plain step against 1.93x,
        both with :data:`cockpit.factors.DEVICE_CHUNK_ELEMENTS` chunks).
        """
        return (
            self.s >= GROUPED_MIN_POSITIONS
            and self.x.device.type == "cpu"
            and "a" not in self.__dict__
        )

    def _per_sample_weight_grad(self, x: Tensor, g: Tensor) -> Tensor:
        """``[K, O', *P[1:]]`` from inputs ``[K, C_in, …]`` and output gradients ``[K, O', …]``."""
        k, rows = x.shape[0], g.shape[1]
        dense = _weight_grad(
            x.reshape(1, -1, *x.shape[2:]),
            (k * rows, *self.shape[1:]),
            g.reshape(1, -1, *g.shape[2:]),
            self.stride,
            self.padding,
            self.dilation,
            k * self.groups,
        )
        return dense.view(k, rows, *self.shape[1:])

    def to_dense(self, start: int = 0, stop: int | None = None) -> Tensor:  # noqa: D102
        if not self._grouped_kernel():
            return super().to_dense(start, stop)
        return self._per_sample_weight_grad(self.x[start:stop], self.g[start:stop])

    def as_column(self) -> ColumnConvFactor:
        """This factor as one curvature column (see :class:`ColumnConvFactor`)."""
        return ColumnConvFactor(self)

    def to_dense_rows(self, lo: int, hi: int) -> Tensor:  # noqa: D102
        if self.groups != 1 or not self._grouped_kernel():
            return super().to_dense_rows(lo, hi)  # raises for groups > 1
        return self._per_sample_weight_grad(self.x, self.g[:, lo:hi])

    def reduce(  # noqa: D102
        self, requests: Iterable[Quantity], param: Tensor, directions: dict[str, Tensor | None]
    ) -> dict[Quantity, Tensor]:
        requests = list(requests)
        cheap = self._cheap_kinds(requests)
        if self.s > 1 and not all(isinstance(q, cheap) for q in requests):
            # per-sample gradients get built: projections come off them (O(N·D))
            return super().reduce(requests, param, directions)
        out: dict[Quantity, Tensor] = {}
        for q in requests:
            if isinstance(q, Projection):
                u = directions.get(q.key)
                if u is None:
                    out[q] = self.g.new_zeros(self.n)
                    continue
                d = len(self.kernel_size)
                y = torch.convolution(
                    self.x,
                    u.to(self.x.dtype),
                    None,
                    self.stride,
                    self.padding,
                    self.dilation,
                    False,
                    (0,) * d,
                    self.groups,
                )
                out[q] = (y * self.g).reshape(self.n, -1).sum(1)
        rest = [q for q in requests if not isinstance(q, Projection)]
        if rest:
            out.update(super().reduce(rest, param, directions))
        return out


class ColumnConvFactor(ColumnAffineFactor):
    """One curvature column (K = 1) of a convolution, e.g. the Monte-Carlo GGN's sample.

    Its squared per-sample gradients come from :class:`ConvFactor`'s grouped
    weight-gradient kernel in chunks of samples where that kernel applies;
    the unfolded patches (``[N, S, C_in·K]``, 113 MB for an All-CNN-C layer at N = 32)
    are built only when another use of the layer needs the affine form.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> layer = torch.nn.Conv2d(16, 4, 3, padding=1).double()
        >>> x = torch.randn(2, 16, 12, 12, dtype=torch.float64)  # input [N, C_in, H, W]
        >>> g = torch.randn(2, 4, 12, 12, dtype=torch.float64)  # the column's output gradient
        >>> f = ColumnConvFactor(ConvFactor(x, g, layer, layer.padding))
        >>> dense = f.to_dense()  # [1, N, *P]
        >>> torch.allclose(f.sum_of_squares(), (dense**2).sum((0, 1)))
        True
        >>> w = torch.tensor([[1.0, -2.0]], dtype=torch.float64)  # weights [K, N]
        >>> ref = (w.view(1, 2, 1, 1, 1, 1) * dense**2).sum((0, 1))  # Σ_n w_n G_n²
        >>> torch.allclose(f.sum_of_squares(w), ref)
        True
        >>> "a" in vars(f.factor)  # no patches were unfolded
        False
    """

    def __init__(self, factor: ConvFactor) -> None:
        self.factor = factor
        self.k, self.n, self.groups, self.s = 1, factor.n, factor.groups, factor.s
        self.shape = factor.shape

    @property
    def a(self) -> Tensor:  # type: ignore[override]
        """The unfolded patches ``[1, N, G, S, C_in/G·K]`` (built on first use)."""
        return self.factor.a[None]

    @property
    def b(self) -> Tensor:  # type: ignore[override]
        """The output gradient ``[1, N, G, S, C_out/G]``."""
        return self.factor.b[None]

    @property
    def _dims(self) -> tuple[int, int]:
        return self.factor._dims

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.factor.to_dense()[None]

    def sum_of_squares(self, weights: Tensor | None = None) -> Tensor:  # noqa: D102
        check_weights(weights, 1, self.n)
        f = self.factor
        if self.groups != 1 or not f._grouped_kernel():
            return super().sum_of_squares(weights)
        step = max(1, _factors.chunk_elements(f.x.device) // self.shape.numel())  # samples
        w = None if weights is None else weights[0].to(f.g.dtype)
        total = None
        for start in range(0, self.n, step):
            sq = f.to_dense(start, start + step).square_()  # [K', *P]
            if w is not None:
                sq *= w[start : start + step].view(-1, *([1] * (sq.dim() - 1)))
            part = sq.sum(0)
            total = part if total is None else total.add_(part)
        assert total is not None
        return total


def _conv_padding(module: nn.modules.conv._ConvNd, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Input with any padding that is not symmetric zero padding applied, and the rest."""
    d = len(module.kernel_size)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return x, (0,) * d
    padding = module.padding
    if padding == "valid":
        return x, (0,) * d
    if padding == "same":
        pads, sym = [], []
        for k, dil in zip(module.kernel_size, module.dilation, strict=True):
            total = dil * (k - 1)
            pads.append((total // 2, total - total // 2))
            sym.append(total // 2)
        if all(lo == hi for lo, hi in pads):
            return x, tuple(sym)
        x = F.pad(x, [p for lo_hi in reversed(pads) for p in lo_hi])
        return x, (0,) * d
    return x, tuple(padding)


@register_layer(nn.Conv1d, nn.Conv2d, nn.Conv3d, scales=True, direct=True)
def conv(
    module: nn.modules.conv._ConvNd, args, kwargs, grad_outputs, wanted, scale: float = 1.0
) -> dict[str, Factor]:
    """Unfolded input patches against the output gradient.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> layer = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular")
        >>> layer = layer.double()
        >>> x = torch.randn(3, 4, 7, 7, dtype=torch.float64)  # input [N, C_in, H, W]
        >>> g = torch.randn(3, 6, 4, 4, dtype=torch.float64)  # output gradient [N, C_out, H', W']
        >>> factors = conv(layer, (x,), {}, (g,), frozenset({"weight", "bias"}))
        >>> type(factors["weight"]).__name__, factors["bias"].to_dense().shape  # bias: [N, C_out]
        ('ConvFactor', torch.Size([3, 6]))
        >>> def dot(p, xn, gn):  # sample n's gradient is ∇_θ ⟨g_n, layer(x_n)⟩
        ...     return (torch.func.functional_call(layer, p, (xn[None],)) * gn[None]).sum()
        >>> per_sample = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(layer.named_parameters()), x, g)  # {name: [N, *P]}
        >>> all(torch.allclose(factors[k].to_dense(), ref[k]) for k in ("weight", "bias"))
        True
    """
    x, g = args[0], grad_outputs[0]
    d = len(module.kernel_size)
    if x.dim() != d + 2:
        raise ValueError(
            f"{type(module).__name__}: expected a batched {d + 2}-d input, got {tuple(x.shape)}"
        )
    out: dict[str, Factor] = {}
    if "weight" in wanted:
        xs, gs = scale_smaller(x, g, scale)
        xs, padding = _conv_padding(module, xs)
        out["weight"] = ConvFactor(xs, gs, module, padding)
    if "bias" in wanted:
        bias = g.reshape(g.shape[0], g.shape[1], -1).sum(2)
        out["bias"] = DenseFactor(bias if scale == 1 else bias * scale)
    return out


@register_layer(
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, scales=True, direct=True
)
def conv_transpose(
    module: nn.modules.conv._ConvTransposeNd,
    args,
    kwargs,
    grad_outputs,
    wanted,
    scale: float = 1.0,
) -> dict[str, Factor]:
    """Adjoint of a convolution: patches of the output gradient against the input.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> layer = torch.nn.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1, groups=2).double()
        >>> x = torch.randn(3, 4, 5, dtype=torch.float64)  # input [N, C_in, L]
        >>> g = torch.randn(3, 2, 12, dtype=torch.float64)  # output gradient [N, C_out, L']
        >>> factors = conv_transpose(layer, (x,), {}, (g,), frozenset({"weight", "bias"}))
        >>> w = factors["weight"]  # a: g's patches [N, G, L, C_out/G·K], b: x [N, G, L, C_in/G]
        >>> w.a.shape, w.b.shape, w.to_dense().shape
        (torch.Size([3, 2, 5, 3]), torch.Size([3, 2, 5, 2]), torch.Size([3, 4, 1, 3]))
        >>> def dot(p, xn, gn):  # sample n's gradient is ∇_θ ⟨g_n, layer(x_n)⟩
        ...     return (torch.func.functional_call(layer, p, (xn[None],)) * gn[None]).sum()
        >>> per_sample = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(layer.named_parameters()), x, g)  # {name: [N, *P]}
        >>> all(torch.allclose(factors[k].to_dense(), ref[k]) for k in ("weight", "bias"))
        True
    """
    x, g = args[0], grad_outputs[0]
    d = len(module.kernel_size)
    if x.dim() != d + 2:
        raise ValueError(
            f"{type(module).__name__}: expected a batched {d + 2}-d input, got {tuple(x.shape)}"
        )
    out: dict[str, Factor] = {}
    if "weight" in wanted:
        xs, gs = scale_smaller(x, g, scale)
        patches = unfold(gs, module.kernel_size, module.stride, module.padding, module.dilation)
        # Patches cover exactly the input positions; output_padding rows are never read.
        expected = x.shape[2:].numel()
        if patches.shape[1] != expected:  # pragma: no cover - guarded by torch's size rules
            raise RuntimeError(
                f"{type(module).__name__}: patch count {patches.shape[1]} != {expected}"
            )
        out["weight"] = AffineFactor(
            _grouped(patches, module.groups), _channels_last(xs, module.groups), module.weight.shape
        )
    if "bias" in wanted:
        bias = g.reshape(g.shape[0], g.shape[1], -1).sum(2)
        out["bias"] = DenseFactor(bias if scale == 1 else bias * scale)
    return out


__all__ = ["unfold", "ConvFactor", "conv", "conv_transpose"]
