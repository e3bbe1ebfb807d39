"""Embeddings: W (V, d) with one-hot inputs, so KFAC's A is diagonal (token frequencies)."""

from __future__ import annotations

import torch.nn.functional as Fn
from torch import nn

from .base import KronRule


class EmbeddingRule(KronRule):
    """W (V, d): ∇W = Σ_r onehot(token_r) ⊗ g_r. A is diagonal (token counts) in the expand form."""

    kinds = (nn.Embedding,)
    order = "ag"
    diagonal_input = True

    def supports(self, module):
        return not module.scale_grad_by_freq and not module.sparse

    def onehot(self, module, a):
        oh = Fn.one_hot(a.reshape(a.shape[0], -1), module.num_embeddings)
        if module.padding_idx is not None:  # torch never updates the padding row
            oh[..., module.padding_idx] = 0
        return oh

    def rows(self, module, a, g):
        k, b = g.shape[:2]
        oh = self.onehot(module, a).to(g.dtype)
        return oh, g.reshape(k, b, -1, g.shape[-1])

    def kfac_grad_rows(self, module, a, g):
        """The G rows (K, B, R, d) alone: a view of the cotangents, without the one-hot rows."""
        return g.reshape(*g.shape[:2], -1, g.shape[-1])

    def token_counts(self, module, a):
        """How often each token occurs in the call: the diagonal of A."""
        return self.onehot(module, a).sum((0, 1))

    def diagonal_input_factor(self, module, a):
        """The diagonal of A (token frequencies) of one call."""
        return self.token_counts(module, a)
