"""KFAC, MC-KFAC and EKFAC products ``F.mv(v)`` of an MLP with biases: each layer's ``Pᵀ (G ⊗ A) P``
(``Pᵀ Eig[Q_G ⊗ Q_A] P``) runs in one routine that writes into its rows of the result (ops: ``Kronecker.bordered_into``, the
block-diagonal's ``out=`` hook). Checked against Kronecker products computed here with torch.func
(``_truth_block``), against the dense matrix of the factors gathered (built here with ``torch.kron``
and the parameter-order permutation), and against the product through the dense route.
"""

import pytest
import torch
from models import loader_of

from nngeo_ops.nn import FIM, FIM_MonteCarlo, PMatEKFAC, PMatKFAC, PVector

from .test_kfac_low_rank import _truth_block, wide_mlp

F64 = torch.float64


def _dense_from_factors(F):
    """``block_diag`` over layers of ``G ⊗ A`` reordered to parameter order (weights, then biases)."""
    blocks = []
    for lid in F.layer_collection.layers:
        f = F.data[lid]
        rows = f.get("A_rows")
        A = rows.T @ rows if rows is not None else f["A"]
        G = f["G"]
        n_out, n_in = G.shape[0], A.shape[0] - 1
        idx = [o * (n_in + 1) + j for o in range(n_out) for j in range(n_in)]
        idx += [o * (n_in + 1) + n_in for o in range(n_out)]
        idx = torch.tensor(idx)
        blocks.append(torch.kron(G, A)[idx][:, idx])
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("sizes", [(6,), (3, 3)])
def test_kfac_mv_matches_the_kronecker_truth(sizes):
    model, x = wide_mlp()
    F = FIM(model, loader_of(x, sizes=sizes), PMatKFAC, progress=False)
    assert "A_rows" in F.data["0"] and "A" in F.data["2"]  # a low-rank and a dense input factor
    truth = torch.block_diag(_truth_block(model, x, 0)[0], _truth_block(model, x, 2)[0])
    v = torch.randn(truth.shape[0], dtype=F64, generator=torch.Generator().manual_seed(0))
    out = F.mv(PVector(F.layer_collection, vector_repr=v))
    torch.testing.assert_close(out.to_torch(), truth @ v)
    torch.testing.assert_close(F.mv(v), truth @ v)  # a flat tensor in, a flat tensor out
    torch.testing.assert_close(F.vTMv(v), v @ truth @ v)


@pytest.mark.parametrize("fim", [FIM, FIM_MonteCarlo])
def test_kfac_mv_matches_its_factors_and_the_dense_route(fim):
    model, x = wide_mlp()
    F = fim(model, loader_of(x, sizes=(6,)), PMatKFAC, progress=False)
    dense = _dense_from_factors(F)
    # the route of several columns (the factors in turn)
    torch.testing.assert_close(F.to_torch(), dense)
    v = torch.randn(dense.shape[0], dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(F.mv(v), dense @ v)
    V = torch.randn(dense.shape[0], 3, dtype=F64)
    torch.testing.assert_close(F.op @ V, dense @ V)
    # the product into a caller's buffer (the ops hook), here a slice of a larger one
    buf = torch.full((dense.shape[0] + 2,), torch.nan, dtype=F64)
    F.op.matvec(v, out=buf[1:-1])
    torch.testing.assert_close(buf[1:-1], dense @ v)
    assert buf[0].isnan() and buf[-1].isnan()


def test_float32_kfac_mv_matches_float64():
    model, x = wide_mlp()
    F = FIM(model, loader_of(x, sizes=(6,)), PMatKFAC, progress=False)
    dense = _dense_from_factors(F)
    m32 = model.float()
    F32 = FIM(m32, loader_of(x.float(), sizes=(6,)), PMatKFAC, progress=False)
    v = torch.randn(dense.shape[0], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(F32.mv(v).double(), dense @ v.double(), rtol=1e-4, atol=1e-5)


def test_ekfac_mv_matches_kfac_before_a_refit_and_its_dense_route():
    model, x = wide_mlp()
    F = FIM(model, loader_of(x, sizes=(6,)), PMatKFAC, progress=False)
    dense = _dense_from_factors(F)
    v = torch.randn(dense.shape[0], dtype=F64, generator=torch.Generator().manual_seed(3))
    E = PMatEKFAC(F.generator, data=F.data)  # eigenbases of the factors (thin for the rows)
    torch.testing.assert_close(E.mv(v), dense @ v)
    R = FIM(model, loader_of(x, sizes=(6,)), PMatEKFAC, progress=False)  # refit diagonal
    torch.testing.assert_close(R.mv(v), R.to_torch() @ v)
