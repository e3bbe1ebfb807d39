"""Whole-model ``torch.func`` paths: Jacobian-vector products and exact Hessians.

These serve the representations that never form per-example gradients:

* the implicit GGN / Fisher, M V = (1/N) Σ_batches Jᵀ (L Lᵀ) (J V), as a batched ``MatFree`` node:
  one forward-mode product (``jvp``, vmapped over the columns of V), the output-space factor, one
  reverse-mode product (``vjp``, vmapped); nothing of size P×P is ever stored;
* the Hessian of the loss, dense, per layer, or as Hessian-vector products (forward over reverse).

Parameters are seen as one flat vector in the layer collection's order; the model's other parameters
and buffers are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vjp, vmap

from .layercollection import LayerCollection


def model_device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Call(nn.Module):
    # functional_call needs a module; this one runs the user's function on the (re-parametrised) model
    def __init__(self, model, function):
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, *batch):
        return self.function(*batch)


class FlatModel:
    """``f(flat, batch) -> outputs`` with the covered parameters replaced by slices of ``flat``."""

    def __init__(self, model: nn.Module, lc: LayerCollection, function):
        named = lc.named_parameters(model)
        self.names = ["model." + n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.wrapper = _Call(model, function)
        self.tangent_mask = self._padding_mask(model, lc)

    @staticmethod
    def _padding_mask(model, lc):
        """0 on Embedding padding rows, which torch's backward never reaches, else None.

        Forward-mode products would see these rows; masking the tangent keeps J V consistent with the
        reverse-mode Jᵀ (and with every hook-based representation).
        """
        parts, any_pad = [], False
        for lid, mod in lc.get_layerid_module_map(model).items():
            for attr, n in zip(lc.layers[lid].attrs, lc.layers[lid].numels):
                m = torch.ones(n, dtype=torch.bool)
                if (
                    isinstance(mod, nn.Embedding)
                    and attr == "weight"
                    and mod.padding_idx is not None
                ):
                    m.view(mod.weight.shape)[mod.padding_idx] = False
                    any_pad = True
                parts.append(m)
        return torch.cat(parts).to(model_device(model)) if any_pad else None

    def __call__(self, flat, batch):
        params, i = {}, 0
        for n, s, k in zip(self.names, self.shapes, self.numels):
            params[n] = flat[i : i + k].view(s)
            i += k
        return functional_call(self.wrapper, params, batch)


def ggn_matmat(fm: FlatModel, batch, factor, v: torch.Tensor):
    """(Σ_n J_nᵀ L_n L_nᵀ J_n) V for one batch, V of shape (P, k); also returns the batch's count.

    ``factor(out, y) -> (L, count)`` with L of shape (K, B, *out_shape).
    """
    w0 = fm.flat0
    f = lambda w: fm(w, batch)  # noqa: E731
    out, pull = vjp(f, w0)
    lmat, count = factor(out.detach(), batch)
    if fm.tangent_mask is not None:
        v = v * fm.tangent_mask[:, None]
    jv = vmap(lambda col: jvp(f, (w0,), (col,))[1], in_dims=1)(v)  # (k, B, *out)
    dims = list(range(2, out.dim() + 1))  # einsum labels: 0 = K, 1 = batch, dims = outputs
    j = len(dims) + 2  # the column of V
    coef = torch.einsum(lmat, [0, 1, *dims], jv, [j, 1, *dims], [0, j, 1])  # L_kᵀ (J v_j) per n
    u = torch.einsum(coef, [0, j, 1], lmat, [0, 1, *dims], [j, 1, *dims])  # (k, B, *out)
    (jtu,) = vmap(pull)(u)
    return jtu.T, count


def hessian_matmat(fm: FlatModel, batch, loss, v: torch.Tensor):
    """(∇² Σ-loss of the batch) V via forward-over-reverse; ``loss(out, batch) -> (value, count)``."""
    w0 = fm.flat0
    g = grad(lambda w: loss(fm(w, batch), batch)[0])
    if fm.tangent_mask is not None:
        v = v * fm.tangent_mask[:, None]
    hv = vmap(lambda col: jvp(g, (w0,), (col,))[1], in_dims=1)(v)
    with torch.no_grad():
        count = loss(fm(w0, batch), batch)[1]
    return hv.T, count


def hessian_dense(fm: FlatModel, batch, loss):
    """The dense Hessian of the batch's summed loss, and its count."""
    h = hessian(lambda w: loss(fm(w, batch), batch)[0])(fm.flat0)
    with torch.no_grad():
        count = loss(fm(fm.flat0, batch), batch)[1]
    return h, count


def hessian_blocks(fm: FlatModel, batch, loss, slices):
    """The diagonal blocks (one per slice) of the Hessian of the batch's summed loss."""
    w0 = fm.flat0
    out = []
    for sl in slices:

        def f(part, sl=sl):
            w = torch.cat([w0[: sl.start], part, w0[sl.stop :]])
            return loss(fm(w, batch), batch)[0]

        out.append(hessian(f)(w0[sl]))
    with torch.no_grad():
        count = loss(fm(w0, batch), batch)[1]
    return out, count
