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
    """Indices ``[N, *]`` and output gradient ``[N, *, E]``."""
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
