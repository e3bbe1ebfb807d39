"""One forward pass carrying a tangent (dual numbers) while it records the reverse graph.

``dual_forward(fm, batch, v)`` returns the model's outputs f(w) — connected to the reverse graph of
the leaf ``w`` — and the tangent J v, in one pass: the per-batch core of the implicit GGN product
(J v, then H, then a backward for Jᵀ u) and of the first product of its cache.

Why a mode around the pass: torch's forward-mode formula of ``addmm`` / ``convolution`` is
bilinear, ``d(x·Wᵀ) = dx·Wᵀ + x·dWᵀ``, and when the input x carries no tangent (the data, at the
first layer) torch fills dx with zeros and still multiplies it by W: one full product of the first
layer wasted per pass, which is the largest layer of most models (for the MLP 784-256-128-10 the
dual forward costs ~3.8 matrix products of the first layer instead of 2), plus two zero tensors the
size of the input. :class:`DataTangentMode` intercepts ``linear`` and ``conv*d`` calls whose input
carries no tangent and whose weight does, and returns the same dual tensor with the tangent
computed as ``op(x, dW, db)`` alone. Exact: the dropped term is a product with zero.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# the weight-linear ops with the data as first argument: op(x, weight, bias, *rest)
_WEIGHT_LINEAR = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


def _split(t):
    return (None, None) if t is None else tuple(fwAD.unpack_dual(t))


class DataTangentMode(TorchFunctionMode):
    """Inside a ``fwAD.dual_level``: ``linear`` / ``conv*d`` with a tangent-free input compute only the
    parameters' tangent (see the module docstring); every other call runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WEIGHT_LINEAR and len(args) >= 2:
            out = self._weight_only(func, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    @staticmethod
    def _weight_only(func, args, kwargs):
        x, weight, rest, kw = args[0], args[1], list(args[2:]), dict(kwargs)
        bias = rest.pop(0) if rest else kw.pop("bias", None)
        if kw or not (torch.is_tensor(x) and torch.is_tensor(weight)):
            return None  # keyword stride/padding/...: torch's own formula (the same values)
        if fwAD.unpack_dual(x).tangent is not None:
            return None
        wp, wt = _split(weight)
        if (
            wt is None
        ):  # a weight outside the collection (its bias in it, or neither): torch's formula
            return None
        bp, bt = _split(bias)
        primal = func(x, wp, bp, *rest)  # recorded on the reverse graph of wp, bp
        return fwAD.make_dual(primal, func(x, wt, bt, *rest))


def dual_forward(fm, batch, w: torch.Tensor, v: torch.Tensor):
    """``(out, jv)``: the outputs of ``fm(w, batch)`` on the reverse graph of ``w`` (a leaf with
    ``requires_grad``), and J v for the flat tangent ``v`` (P,), or None where the outputs do not
    depend on the covered parameters. Call with grad mode enabled."""
    with fwAD.dual_level(), DataTangentMode():
        out_d = fm(fwAD.make_dual(w, v.to(w.dtype)), batch)
        out, jv = fwAD.unpack_dual(out_d)
    return out, jv
