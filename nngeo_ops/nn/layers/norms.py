"""Normalisation layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm): an elementwise affine map
after the normalisation, whose exact block couples only γ_e with β_e."""

from __future__ import annotations

import torch.nn.functional as Fn
from torch import nn

from .base import Rule


class NormRule(Rule):
    """Elementwise affine after a normalisation: s = γ ⊙ x̂ + β."""

    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    structured = True

    def xhat(self, m, a):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            batch_stats = m.training or m.running_mean is None
            rm, rv = (None, None) if batch_stats else (m.running_mean, m.running_var)
            return Fn.batch_norm(a, rm, rv, None, None, batch_stats, 0.0, m.eps)
        if isinstance(m, nn.LayerNorm):
            return Fn.layer_norm(a, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return Fn.group_norm(a, m.num_groups, None, None, m.eps)
        return Fn.rms_norm(a, m.normalized_shape, None, m.eps)

    def reduce(self, m, t):
        """(K, B, *out_shape) -> (K, B, *param_shape), summing positions that share a parameter."""
        if isinstance(m, nn.LayerNorm | nn.RMSNorm):
            nd = len(m.normalized_shape)
            return t.reshape(*t.shape[:2], -1, *t.shape[t.dim() - nd :]).sum(2)
        return t.reshape(*t.shape[:3], -1).sum(-1)  # channel is dim 1 of the output

    def per_example(self, module, a, g):
        xh = self.xhat(module, a.detach())
        out = {"weight": self.reduce(module, g * xh)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = self.reduce(module, g)
        return out

    def diag(self, module, a, g, out=None):
        return None
