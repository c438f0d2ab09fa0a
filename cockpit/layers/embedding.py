"""``nn.Embedding`` (incl. ``padding_idx``) in index form; no one-hot is built."""

from __future__ import annotations

from torch import nn

from cockpit.factors import EmbeddingFactor, Factor
from cockpit.layers import UnsupportedModuleError, register_layer


def _check_embedding(module: nn.Embedding) -> None:
    if module.scale_grad_by_freq:
        raise UnsupportedModuleError(
            "Embedding(scale_grad_by_freq=True) scales gradients by token frequencies in the "
            "whole mini-batch, which couples the samples: per-sample gradients are undefined. "
            "Use scale_grad_by_freq=False."
        )


@register_layer(nn.Embedding, check=_check_embedding)
def embedding(module: nn.Embedding, args, kwargs, grad_outputs, wanted) -> dict[str, Factor]:
    """Indices ``[N, *]`` and output gradient ``[N, *, E]``.

    Example:
        >>> import torch
        >>> from cockpit.layers import find_rule
        >>> _ = torch.manual_seed(0)
        >>> emb = torch.nn.Embedding(6, 3, padding_idx=0).double()
        >>> idx = torch.tensor([[1, 2, 2, 0], [5, 0, 0, 0]])  # N = 2 sequences of 4 tokens, 0 pads
        >>> g = torch.randn(2, 4, 3, dtype=torch.float64)  # output gradient [N, *, E]
        >>> f = embedding(emb, (idx,), {}, (g,), frozenset({"weight"}))["weight"]
        >>> type(f).__name__, f.rows()[2].shape  # only the U = 3 touched (sample, token) rows
        ('EmbeddingFactor', torch.Size([3, 3]))
        >>> def dot(p, idx_n, gn):  # sample n's gradient is ∇_θ ⟨g_n, emb(idx_n)⟩
        ...     return (torch.func.functional_call(emb, p, (idx_n[None],)) * gn[None]).sum()
        >>> per_sample = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))
        >>> ref = per_sample(dict(emb.named_parameters()), idx, g)["weight"]  # [N, V, E]
        >>> torch.allclose(f.to_dense(), ref)
        True
        >>> freq = torch.nn.Embedding(6, 3, scale_grad_by_freq=True)
        >>> find_rule(freq).check(freq)  # the engine runs this check at forward time
        Traceback (most recent call last):
        ...
        cockpit.layers.UnsupportedModuleError: Embedding(scale_grad_by_freq=True) scales ...
    """
    if "weight" not in wanted:
        return {}
    idx, g = args[0], grad_outputs[0]
    if idx.dim() < 1:
        raise ValueError("Embedding: input without a batch dimension")
    n = idx.shape[0]
    return {
        "weight": EmbeddingFactor(
            idx.reshape(n, -1),
            g.reshape(n, -1, module.embedding_dim),
            module.num_embeddings,
            module.padding_idx,
        )
    }


__all__ = ["embedding"]
