"""Layers of NNGeometry's ``nngeometry.layers``, for models written against it.

* :class:`Affine1d`: ``y = w ⊙ x + b`` per feature (the affine part of a normalisation, alone);
* :class:`Cosine1d`: ``y_o = ⟨x / ‖x‖_ε, W_o / ‖W_o‖_ε⟩`` (cosine similarity with each row of W);
* :class:`WeightNorm1d`: ``y = (W / ‖W_o‖_ε) x``, each row of W normalised;
* :class:`WeightNorm2d`: a convolution whose filters are normalised, ``W_o / ‖W_o‖_ε``.

Here ``‖v‖_ε = sqrt(Σ v² + ε)``. None of these is a plain ``nn.Linear`` / ``nn.Conv2d`` call (the
weight is transformed before use), so no Kronecker rule applies: their per-example gradients come from
the generic ``torch.func`` path of :mod:`nngeo_ops.nn.layers.generic`, which is exact, and dense, diagonal,
block-diagonal, low-rank and implicit representations cover them. KFAC asks for a structured rule
and names them in its error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as Fn


def _rownorm(w: Tensor, dims, eps: float) -> Tensor:
    return torch.sqrt((w * w).sum(dim=dims, keepdim=True) + eps)


class Cosine1d(nn.Linear):
    """Cosine similarity between the input (B, in) and each row of the weight (out, in); no bias."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.eps = eps

    def forward(self, input: Tensor) -> Tensor:
        x = input / _rownorm(input, 1, self.eps)
        return Fn.linear(x, self.weight / _rownorm(self.weight, 1, self.eps))


class WeightNorm1d(nn.Linear):
    """``x ↦ (W / ‖W_o‖_ε) x`` with rows of W normalised; no bias."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.eps = eps

    def forward(self, input: Tensor) -> Tensor:
        return Fn.linear(input, self.weight / _rownorm(self.weight, 1, self.eps))


class WeightNorm2d(nn.Conv2d):
    """A bias-free 2-d convolution with each output filter normalised, ``W_o / ‖W_o‖_ε``."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        if kwargs.pop("bias", False):
            raise ValueError("WeightNorm2d has no bias; drop bias=True")
        super().__init__(*args, bias=False, **kwargs)
        self.eps = eps

    def forward(self, input: Tensor) -> Tensor:
        w = self.weight / _rownorm(self.weight, (1, 2, 3), self.eps)
        return self._conv_forward(input, w, None)


class Affine1d(nn.Module):
    """``y = x ⊙ w + b`` over the features of (B, num_features) inputs; w starts at 1, b at 0."""

    def __init__(self, num_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, input: Tensor) -> Tensor:
        out = input * self.weight.unsqueeze(0)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, bias={self.bias is not None}"
