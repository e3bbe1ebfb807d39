"""Linear layers: the rows of the KFAC form are the inputs and the output cotangents."""

from __future__ import annotations

from torch import nn

from .base import KronRule


class LinearRule(KronRule):
    """y = x Wᵀ + b on inputs (B, ..., d_in); extra middle dims are weight-sharing positions."""

    kinds = (nn.Linear,)

    def rows(self, module, a, g):
        b, k = a.shape[0], g.shape[0]
        return a.reshape(b, -1, a.shape[-1]), g.reshape(k, b, -1, g.shape[-1])
