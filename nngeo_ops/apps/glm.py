"""The GLM functional variance J P⁻¹ Jᵀ of a Laplace posterior, per test point.

Two routes, both exact for the posterior they are given:

* :func:`jacobian_functional`: the Jacobian rows of a chunk of B test points, (C·B) × P, from the
  :class:`~nngeo_ops.nn.Jacobian` node (checked against the memory limit first), against P⁻¹
  through the posterior's route (one product with Qᵀ on the spectral route, CG on the iterative
  one, whose error bound is carried along). Rows are output-major (row = c·B + b), so the
  per-example C × C blocks are a strided diagonal of the (C·B)² result.
* :class:`LastLayerKron`: a Linear last layer in KFAC/EKFAC, whose block of P in Kronecker order is
  (Q_G ⊗ Q_A)·diag(s·λ_ij + δ)·(Q_G ⊗ Q_A)ᵀ. The Jacobian of the outputs with respect to that
  layer is I_C ⊗ φ̃ᵀ (φ̃ the layer's input with a trailing 1 for the bias), so

      J P⁻¹ Jᵀ = Q_G · diag(w) · Q_Gᵀ,   w_i = Σ_j (φ̃ᵀ q_A,j)² / (s·λ_ij + δ),

  which for δ → 0 and KFAC (λ_ij = λ_G,i·λ_A,j) is (φ̃ᵀ A⁻¹ φ̃)·G⁻¹ / s. Neither φ̃ᵀ ⊗ I nor any
  Jacobian row is formed: one forward pass and O(B·(dA² + C·dA + C²)) work per chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from ..memory import check_memory
from ..nn import Jacobian, PMatEKFAC, PMatKFAC
from .posterior import IterativePosterior


def last_layer_kron_applies(rep, lc, model) -> bool:
    """Whether ``lc`` is one Linear layer (weight first) of a KFAC/EKFAC representation ``rep``."""
    if rep not in (PMatKFAC, PMatEKFAC) or len(lc.layers) != 1:
        return False
    (lid,) = lc.layers
    mod = lc.get_layerid_module_map(model)[lid]
    return isinstance(mod, nn.Linear) and lc.layers[lid].attrs[0] == "weight"


class LastLayerKron:
    """The eigen form of a Linear last layer's KFAC/EKFAC block: Q_G, Q_A and λ [C, dA]."""

    def __init__(self, F, lc, model):
        (lid,) = lc.layers
        self.module = lc.get_layerid_module_map(model)[lid]
        f = F.data[lid]
        if "diag" in f:  # EKFAC: its refitted eigenvalues in the basis Q_G ⊗ Q_A
            qg, qa = f["QG"], f["QA"]
            lam = f["diag"].reshape(qg.shape[1], qa.shape[1])
        else:
            a, g = F.get_factors(lid)
            ea, qa = torch.linalg.eigh(a)
            eg, qg = torch.linalg.eigh(g)
            lam = eg.clamp_min(0)[:, None] * ea.clamp_min(0)[None, :]
        self.qg, self.qa, self.lam = qg, qa, lam.clamp_min(0)
        self.bias = self.module.bias is not None

    def functional(self, model, x, s, delta):
        """(f(x) [B, C], J P⁻¹ Jᵀ [B, C, C]) for a scalar prior ``delta[0]``."""
        feats = []
        handle = self.module.register_forward_hook(
            lambda m, inp, out: feats.append(inp[0].detach())
        )
        try:
            with torch.no_grad():
                f = model(x)
        finally:
            handle.remove()
        phi = feats[-1]
        if self.bias:
            phi = torch.cat([phi, torch.ones_like(phi[:, :1])], 1)
        u2 = (phi @ self.qa).square()  # (B, dA)
        w = u2 @ (1.0 / (s * self.lam + delta[0])).mT  # (B, C): Σ_j u_j² / (s λ_ij + δ)
        var = (self.qg[None] * w[:, None, :]) @ self.qg.mT[None]
        return f, var


def jacobian_functional(model, lc, x, route, s, delta, n_outputs, settings):
    """(f(x) [B, C], J P⁻¹ Jᵀ [B, C, C], its error bound or None) from Jacobian rows."""
    c, b, p = n_outputs, x.shape[0], lc.numel()
    check_memory(
        3 * c * b * p * x.dtype.itemsize,
        f"the Jacobian rows of {b} test points ({c}·{b}×{p})",
        "lower settings.chunk_size or use subset='last_layer'",
        settings.memory_limit,
        x.device,
    )
    J = Jacobian(model, [x], layer_collection=lc, progress=False)
    jt = J.to_torch().reshape(c * b, p).mT  # (P, C·b), rows c·b + n
    m = route.inv_quad(jt, s, delta)  # (C·b, C·b)
    var = torch.diagonal(m.reshape(c, b, c, b), dim1=1, dim2=3).permute(2, 0, 1)
    err = route.last_error.get("inv_quad") if isinstance(route, IterativePosterior) else None
    if err is not None:
        err = torch.diagonal(err.reshape(c, b, c, b), dim1=1, dim2=3).permute(2, 0, 1)
    return J.outputs.mT, var, err
