"""Generic ``torch.func`` path: per-sample gradients of any module's own parameters.

For a module call ``y = m(x; θ)`` with output gradient ``b = ∂L/∂y``, sample n's
gradient is ``∇_θ ⟨b_n, m(x_n; θ)⟩``: the module is re-run on each sample (as a batch
of one) inside ``vmap(grad(...))``. It is exact for any module whose samples do not
interact, costs about one extra forward and backward of that module, and materializes
``[N, *P]`` per parameter. Stochastic modules (dropout inside) cannot be re-run
identically and raise.

A module whose output rows are per-sample but do not come from per-sample inputs
(learned per-sample codes returned whole, ``codes * 1.0``) gives a full batch of rows
when re-run on one sample. Sample n's gradient is then read off the batch call:
``∇_θ ⟨b_n, m(x; θ)_n⟩``, one vector-Jacobian product per sample (vmapped over
one-hot weights on the output rows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cockpit.factors import DenseFactor, Factor
from cockpit.layers import UnsupportedModuleError

__all__ = ["tensor_outputs", "per_sample_gradients", "functorch_rule"]


class _NotPerSample(Exception):
    """A re-run on one sample returned an output whose batch dimension is not 1."""


def tensor_outputs(output) -> list[Tensor]:
    """The tensors of a module output (a tensor, or a tuple/list/dict of them), in order.

    Example:
        >>> import torch
        >>> a, b = torch.zeros(2), torch.ones(3)
        >>> [t.shape for t in tensor_outputs((a, None, b))]  # non-tensors are skipped
        [torch.Size([2]), torch.Size([3])]
        >>> [t.shape for t in tensor_outputs({"logits": b, "aux": a, "steps": 3})]  # in dict order
        [torch.Size([3]), torch.Size([2])]
        >>> tensor_outputs(a)[0] is a, tensor_outputs("text")
        (True, [])
    """
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [o for o in output if isinstance(o, Tensor)]
    return []


def per_sample_gradients(
    module: nn.Module,
    params: dict[str, Tensor],
    call: Callable[[dict[str, Tensor], dict[str, Tensor]], list[Tensor]],
    inputs: dict[str, Tensor],
    in_dims: dict[str, int | None],
    grad_outputs: list[Tensor | None],
    out_dims: list[int],
) -> dict[str, Tensor]:
    """Per-sample gradients ``[N, *P]`` of ``Σ_k ⟨b_k, out_k⟩`` w.r.t. ``params``.

    Args:
        module: The module (for error messages).
        params: ``{name: tensor}`` to differentiate.
        call: ``call(params, sample_inputs) -> [outputs]`` evaluating the module on a batch
            of one; ``sample_inputs`` holds each batched input with its batch dim restored
            as size 1.
        inputs: Module inputs by name.
        in_dims: Batch dim of each input (None: shared by all samples).
        grad_outputs: Output gradients (None: output got no gradient).
        out_dims: Batch dim of each output.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(3, 2).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)  # per-sample input [N, I]
        >>> mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # shared by all samples
        >>> g = torch.randn(5, 2, dtype=torch.float64)  # output gradient [N, O]
        >>> def call(p, xs):  # one sample: xs["x"] is [1, I]
        ...     return [torch.func.functional_call(lin, p, (xs["x"] * xs["mask"],))]
        >>> params = {k: p.detach() for k, p in lin.named_parameters()}
        >>> inputs, in_dims = {"x": x, "mask": mask}, {"x": 0, "mask": None}
        >>> grads = per_sample_gradients(lin, params, call, inputs, in_dims, [g], [0])
        >>> grads["weight"].shape  # [N, *P]
        torch.Size([5, 2, 3])
        >>> ref = g[:, :, None] * (x * mask)[:, None, :]  # g_n (x_n ⊙ m)ᵀ
        >>> torch.allclose(grads["weight"], ref)
        True
        >>> torch.allclose(grads["bias"], g)
        True
    """
    cots = [c for c in grad_outputs if c is not None]
    keep = [i for i, c in enumerate(grad_outputs) if c is not None]
    cot_dims = [out_dims[i] for i in keep]

    def sample_loss(p, xs, cs):
        xs = {k: (v.unsqueeze(in_dims[k]) if in_dims[k] is not None else v) for k, v in xs.items()}
        outs = call(p, xs)
        total = 0.0
        for i, c, d in zip(keep, cs, cot_dims, strict=True):
            if outs[i].dim() <= d or outs[i].shape[d] != 1:
                raise _NotPerSample
            total = total + (outs[i] * c.unsqueeze(d)).sum()
        return total

    try:
        return vmap(grad(sample_loss), in_dims=(None, dict(in_dims), cot_dims), randomness="error")(
            params, inputs, cots
        )
    except _NotPerSample:
        return _row_gradients(module, params, call, inputs, cots, keep, cot_dims)
    except RuntimeError as err:
        if "random" in str(err).lower():
            raise UnsupportedModuleError(
                f"{type(module).__name__} draws random numbers in forward (e.g. dropout), so it "
                "cannot be re-run per sample to get its per-sample gradients. Disable the "
                "randomness (dropout=0 or eval mode) or register an exact rule for it."
            ) from err
        raise


def _row_gradients(
    module: nn.Module,
    params: dict[str, Tensor],
    call: Callable[[dict[str, Tensor], dict[str, Tensor]], list[Tensor]],
    inputs: dict[str, Tensor],
    cots: list[Tensor],
    keep: list[int],
    cot_dims: list[int],
) -> dict[str, Tensor]:
    """``∇_θ ⟨b_n, out_n⟩`` with the module called on the whole batch, for every n."""
    n = cots[0].shape[cot_dims[0]]
    outs = call(params, inputs)
    for i, c in zip(keep, cots, strict=True):
        if outs[i].shape != c.shape:
            raise UnsupportedModuleError(
                f"{type(module).__name__}: an output of shape {tuple(outs[i].shape)} gets a "
                f"gradient of shape {tuple(c.shape)}, so its rows cannot be matched to the "
                f"{n} samples. Register an exact rule for it (cockpit.layers.register_layer)."
            )

    def weighted(p, onehot):
        outs = call(p, inputs)
        total = 0.0
        for i, c, d in zip(keep, cots, cot_dims, strict=True):
            shape = [1] * c.dim()
            shape[d] = n
            total = total + (outs[i] * c * onehot.view(shape)).sum()
        return total

    eye = torch.eye(n, dtype=cots[0].dtype, device=cots[0].device)
    return vmap(grad(weighted), in_dims=(None, 0), randomness="error")(params, eye)


def functorch_rule(module: nn.Module, args, kwargs, grad_outputs, wanted) -> dict[str, Factor]:
    """Fallback for modules without a rule: tensors whose dim 0 equals N are per-sample.

    Example:
        >>> import torch
        >>> from cockpit.layers import find_rule
        >>> _ = torch.manual_seed(0)
        >>> prelu = torch.nn.PReLU(3).double()  # y = max(0, x) + w ⊙ min(0, x); it has no rule
        >>> find_rule(prelu) is None
        True
        >>> x = torch.randn(5, 3, 4, dtype=torch.float64)  # [N, C, L]
        >>> g = torch.randn(5, 3, 4, dtype=torch.float64)  # output gradient, same shape
        >>> factors = functorch_rule(prelu, (x,), {}, (g,), frozenset({"weight"}))
        >>> w = factors["weight"].to_dense()  # [N, *P]
        >>> ref = (g * x.clamp(max=0)).sum(2)  # Σ_l g[n,c,l] · min(0, x[n,c,l])
        >>> w.shape, torch.allclose(w, ref)
        (torch.Size([5, 3]), True)
        >>> class Noisy(torch.nn.Linear):  # draws random numbers in forward
        ...     def forward(self, x):
        ...         return super().forward(torch.nn.functional.dropout(x, 0.5))
        >>> x, g = torch.randn(5, 2), torch.randn(5, 2)
        >>> functorch_rule(Noisy(2, 2), (x,), {}, (g,), frozenset({"weight"}))
        Traceback (most recent call last):
        ...
        cockpit.layers.UnsupportedModuleError: Noisy draws random numbers in forward ...
    """
    n = next(g.shape[0] for g in grad_outputs if g is not None)
    params = {k: p.detach() for k, p in module.named_parameters(recurse=False) if k in wanted}
    inputs: dict[str, Tensor] = {}
    in_dims: dict[str, int | None] = {}
    arg_slots: list[str | object] = []
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            inputs[f"arg{i}"] = a.detach()
            in_dims[f"arg{i}"] = 0 if a.dim() > 0 and a.shape[0] == n else None
            arg_slots.append(f"arg{i}")
        else:
            arg_slots.append(_Const(a))
    kw_static = {}
    for k, v in kwargs.items():
        if isinstance(v, Tensor):
            inputs[f"kw_{k}"] = v.detach()
            in_dims[f"kw_{k}"] = 0 if v.dim() > 0 and v.shape[0] == n else None
        else:
            kw_static[k] = v

    def call(p, xs):
        call_args = tuple(xs[s] if isinstance(s, str) else s.value for s in arg_slots)
        call_kwargs = dict(kw_static)
        call_kwargs.update({k[3:]: v for k, v in xs.items() if k.startswith("kw_")})
        return tensor_outputs(functional_call(module, p, call_args, call_kwargs))

    out_dims = [0] * len(grad_outputs)
    grads = per_sample_gradients(
        module, params, call, inputs, in_dims, list(grad_outputs), out_dims
    )
    return {k: DenseFactor(v) for k, v in grads.items()}


class _Const:
    """A non-tensor positional argument passed through unchanged."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value
