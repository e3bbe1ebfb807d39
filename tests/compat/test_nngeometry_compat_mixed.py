"""NNGeometry's ``PMatMixed`` API in the compatibility layer, against torch.func ground truth.

``PMatMixed.from_mapping(lc, backend, default_representation, map_layers_to)`` (layer classes as
keys) and NNGeometry's constructor ``PMatMixed(lc, generator, layer_collection_each, layer_map,
sub_pmats)`` from parts built beforehand. NNGeometry inverts and solves a mixed matrix part by part
with each part's own convention: a KFAC part π-damped, the other parts damped exactly; a ``solve``
may be chosen per part (a dict keyed by representation class).
"""

import math

import groundtruth as gt
import pytest
import torch
from torch import nn

from nngeo_ops.compat.nngeometry.backend import TorchHooksJacobianBackend
from nngeo_ops.compat.nngeometry.layercollection import LayerCollection, LinearLayer
from nngeo_ops.compat.nngeometry.object.pspace import PMatBlockDiag, PMatKFAC, PMatMixed
from nngeo_ops.compat.nngeometry.object.vector import random_pvector
from nngeo_ops.errors import NNGeoError

D = torch.float64


def _task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 2)).to(D)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 4, generator=g, dtype=D), torch.randint(0, 2, (10,), generator=g)
    return model, [(x[:5], y[:5]), (x[5:], y[5:])], x


def _interleave(n_out, n_in):
    w = torch.arange(n_out * n_in).view(n_out, n_in)
    b = n_out * n_in + torch.arange(n_out).view(n_out, 1)
    return torch.cat([w, b], 1).reshape(-1)


def _pi_inverse_param_order(A, G, lam):
    """(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹ of a Linear layer with a bias, in parameter order."""
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    s = math.sqrt(lam)
    inter = torch.kron(
        torch.linalg.inv(G + s / pi * torch.eye(len(G), dtype=D)),
        torch.linalg.inv(A + pi * s * torch.eye(len(A), dtype=D)),
    )
    perm = torch.argsort(_interleave(len(G), len(A) - 1))
    return inter[perm][:, perm]


def test_from_mapping_joins_parts_and_inverts_them_with_their_own_convention():
    model, loader, x = _task()
    lc = LayerCollection.from_model(model)
    backend = TorchHooksJacobianBackend(model)
    M = PMatMixed.from_mapping(lc, backend, PMatBlockDiag, {LinearLayer: PMatKFAC}, examples=loader)
    assert set(M.sub_pmats) == {PMatBlockDiag, PMatKFAC}
    assert M.layer_map == {"0": PMatKFAC, "1": PMatBlockDiag, "3": PMatKFAC}
    sl = lc.layer_slices()
    j = gt.jacobian(model, x).reshape(-1, lc.numel())
    truth = j.T @ j / x.shape[0]
    dense = M.to_torch()
    # the LayerNorm part is exact; nothing couples different layers
    torch.testing.assert_close(dense[sl["1"], sl["1"]], truth[sl["1"], sl["1"]])
    for a in sl:
        for b in sl:
            if a != b:
                assert dense[sl[a], sl[b]].count_nonzero() == 0
    lam = 0.05
    K = M.sub_pmats[PMatKFAC]
    blocks = {lid: _pi_inverse_param_order(*K.get_factors(lid), lam) for lid in ("0", "3")}
    B = truth[sl["1"], sl["1"]]
    blocks["1"] = torch.linalg.inv(B + lam * torch.eye(len(B), dtype=D))
    ref = torch.block_diag(*(blocks[lid] for lid in lc.layers))
    torch.testing.assert_close(M.inv(lam).to_torch(), ref)
    v = random_pvector(lc)
    torch.testing.assert_close(M.solve(v, regul=lam).to_torch(), ref @ v.to_torch())
    # a solve chosen per part: the pseudo-inverse (eigenvalues ≤ λ dropped) on the LayerNorm part
    ev, q = torch.linalg.eigh(B)
    keep = ev > lam
    blocks["1"] = (q[:, keep] / ev[keep]) @ q[:, keep].T
    ref = torch.block_diag(*(blocks[lid] for lid in lc.layers))
    out = M.solve(v, regul=lam, solve={PMatKFAC: "default", PMatBlockDiag: "lstsq"})
    torch.testing.assert_close(out.to_torch(), ref @ v.to_torch())


def test_nngeometry_constructor_from_parts_built_beforehand():
    model, loader, x = _task()
    lc = LayerCollection.from_model(model)
    backend = TorchHooksJacobianBackend(model)
    each = {PMatKFAC: LayerCollection(), PMatBlockDiag: LayerCollection()}
    layer_map = {}
    for lid, layer in lc.layers.items():
        rep = PMatKFAC if isinstance(layer, LinearLayer) else PMatBlockDiag
        each[rep].add_layer(lid, layer)
        layer_map[lid] = rep
    parts = {rep: rep(each[rep], backend, examples=loader) for rep in each}
    M = PMatMixed(lc, backend, each, layer_map, parts)
    ref = PMatMixed.from_mapping(
        lc, backend, PMatBlockDiag, {LinearLayer: PMatKFAC}, examples=loader
    )
    torch.testing.assert_close(M.to_torch(), ref.to_torch())
    j = gt.jacobian(model, x).reshape(-1, lc.numel())
    sl = lc.layer_slices()["1"]
    torch.testing.assert_close(M.to_torch()[sl, sl], (j.T @ j / x.shape[0])[sl, sl])
    v = random_pvector(lc)
    torch.testing.assert_close(M.mv(v).to_torch(), M.to_torch() @ v.to_torch())
    # parts that do not cover the collection exactly once
    with pytest.raises(NNGeoError, match="exactly once"):
        PMatMixed(lc, backend, each, layer_map, {PMatKFAC: parts[PMatKFAC]})
