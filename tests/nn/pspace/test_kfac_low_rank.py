"""KFAC input factors gathered from fewer rows than half their size are kept low rank (their rows).

Checked against the same Kronecker products computed here with torch.func (as in test_kfac.py), and
against the dense path: damped solves, log-determinants, diagonals, EKFAC and π-damping agree.
"""

import groundtruth as gt
import pytest
import torch
from models import loader_of
from torch import nn

from nngeo_ops.nn import FIM, PMatEKFAC, PMatKFAC
from nngeo_ops.nn.engine.accumulators import KroneckerFactors
from nngeo_ops.ops import LowRank

F64 = torch.float64


def wide_mlp(bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias))
    return model.double(), torch.randn(6, 20, dtype=F64)


def _walk(node):
    yield node
    for c in node.children():
        yield from _walk(c)


def _ones(a):
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)


def _truth_block(model, x, i):
    """A ⊗ G of layer i in parameter order (weights row-major, then biases)."""
    layer = model[i]
    a = model[:i](x).detach()
    bias = layer.bias is not None
    at = _ones(a) if bias else a
    A = at.T @ at / x.shape[0]
    hb = gt.fisher_blocks(model(x), "classif_logits")
    G = gt.output_cotangent_grams(model[i + 1 :], layer(a), hb, lambda j: [j])
    n_out, n_in = G.shape[0], a.shape[1]
    idx = [o * (n_in + bias) + j for o in range(n_out) for j in range(n_in)]
    if bias:
        idx += [o * (n_in + 1) + n_in for o in range(n_out)]
    idx = torch.tensor(idx)
    return torch.kron(G, A)[idx][:, idx], A


@pytest.mark.parametrize("bias", [True, False])
def test_wide_layer_factor_is_kept_as_rows_and_exact(bias):
    model, x = wide_mlp(bias)
    F = FIM(model, loader_of(x, sizes=(2, 2)), PMatKFAC, progress=False)  # 6 rows < 21 / 2
    f = F.data["0"]
    assert "A_rows" in f and "A" not in f
    assert any(isinstance(n, LowRank) for n in _walk(F.op.blocks[0]))
    assert "U" not in str(F.op) and "(G⊗A)" in str(F.op)
    truth, A = _truth_block(model, x, 0)
    sl = F.layer_collection.layer_slices()["0"]
    torch.testing.assert_close(F.to_torch()[sl, sl], truth)
    torch.testing.assert_close(F.get_factors("0")[0], A)  # "A" is formed on demand
    assert "A" in f
    # the narrow second layer (6 + 1 inputs, 6 rows) stays dense
    assert "A_rows" not in F.data["2"]


@pytest.mark.parametrize("sizes", [(6,), (2, 4)])
def test_kept_rows_are_stored_feature_major(sizes):
    # the rows are kept as a transposed view of a (dA, n) block, so that the LowRank node's
    # U = rowsᵀ is that block itself (no copy), one batch or several joined
    model, x = wide_mlp()
    F = FIM(model, loader_of(x, sizes=sizes), PMatKFAC, progress=False)
    rows = F.data["0"]["A_rows"]
    assert rows.shape == (6, 21) and rows.mT.is_contiguous()
    truth, A = _truth_block(model, x, 0)
    torch.testing.assert_close(rows.T @ rows, A)
    sl = F.layer_collection.layer_slices()["0"]
    torch.testing.assert_close(F.to_torch()[sl, sl], truth)


def _dense_twin(F):
    """The same KFAC with every input factor dense (the factors formed from the rows)."""
    data = {
        lid: KroneckerFactors({k: v for k, v in f.items() if k != "A_rows"} | {"A": f["A"]})
        if "G" in f
        else f
        for lid, f in F.data.items()
    }
    return PMatKFAC(F.generator, data=data)


def test_damped_quantities_agree_with_the_dense_factors():
    model, x = wide_mlp()
    F = FIM(model, loader_of(x, sizes=(3,)), PMatKFAC, progress=False)
    D = _dense_twin(F)
    assert "A_rows" in F.data["0"] and "A_rows" not in D.data["0"]
    dense = D.to_torch()
    torch.testing.assert_close(F.to_torch(), dense)
    p = dense.shape[0]
    v = torch.randn(p, dtype=F64, generator=torch.Generator().manual_seed(1))
    for lam in (1e-3, 0.1):
        truth = torch.linalg.solve(dense + lam * torch.eye(p, dtype=F64), v)
        torch.testing.assert_close(F.solve(v, regul=lam), truth)
    lam = 1e-2
    damped_dense = dense + lam * torch.eye(p, dtype=F64)
    damped = F._damped(lam)
    torch.testing.assert_close(damped.logdet(), torch.linalg.slogdet(damped_dense)[1])
    torch.testing.assert_close(F.get_diag(), dense.diagonal())
    torch.testing.assert_close(F.trace(), dense.trace())
    torch.testing.assert_close(F.mv(v), dense @ v)
    # π-damping and EKFAC need A itself: they form it from the rows and match the dense twin
    torch.testing.assert_close(
        F.solve(v, regul=lam, damping="pi"), D.solve(v, regul=lam, damping="pi")
    )
    E = PMatEKFAC(F.generator, data=F.data)
    torch.testing.assert_close(E.to_torch(), dense)


def test_rows_become_dense_once_there_are_too_many():
    model, x = wide_mlp()
    x = torch.cat([x, torch.randn(10, 20, dtype=F64)])  # 16 rows > 21 / 2, arriving in batches
    F = FIM(model, loader_of(x, sizes=(4, 4, 4)), PMatKFAC, progress=False)
    assert "A_rows" not in F.data["0"] and F.data["0"]["A"].shape == (21, 21)
    truth, _ = _truth_block(model, x, 0)
    sl = F.layer_collection.layer_slices()["0"]
    torch.testing.assert_close(F.to_torch()[sl, sl], truth)


def test_gradient_through_a_damped_low_rank_solve():
    # the completed basis of the low-rank factor carries the variation of its range: gradients of a
    # damped solve with respect to the rows match those through the dense factor
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(3, 8, dtype=F64, generator=g)
    G = torch.randn(4, 4, dtype=F64, generator=g)
    G = G @ G.T
    v = torch.randn(32, dtype=F64, generator=g)
    from nngeo_ops.ops import Dense, Identity, Kronecker

    def through(low_rank):
        r = rows.clone().requires_grad_(True)
        a = LowRank(r.T, psd=True) if low_rank else Dense(r.T @ r, psd=True)
        op = Kronecker(Dense(G, psd=True), a) + 0.1 * Identity(32)
        out = op.solve(v).square().sum() + op.logdet()
        (grad,) = torch.autograd.grad(out, r)
        return out.detach(), grad

    (o1, g1), (o2, g2) = through(True), through(False)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(g1, g2)


def test_ekfac_refit_from_a_low_rank_factor_matches_the_dense_basis():
    # the completed basis from the rows' QR spans the same eigenspaces as eigh of the dense factor;
    # gradients have no component on A's null space, so the refit diagonal is basis-independent
    model, x = wide_mlp()
    loader = loader_of(x, sizes=(3,))
    E = FIM(model, loader, PMatEKFAC, progress=False)
    assert "A_rows" in E.data["0"]
    K = FIM(model, loader, PMatKFAC, progress=False)
    D = PMatEKFAC(K.generator, data=_dense_twin(K).data)
    D.update_diag(loader)
    torch.testing.assert_close(E.to_torch(), D.to_torch())
    truth = gt.fim(model, x, "classif_logits")
    sl = E.layer_collection.layer_slices()["0"]
    assert (E.to_torch()[sl, sl] - truth[sl, sl]).norm() <= (
        K.to_torch()[sl, sl] - truth[sl, sl]
    ).norm() + 1e-12
