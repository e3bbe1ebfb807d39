"""Pickling and ``torch.save`` round trips of operator nodes (also after a solve, whose compiled
closures and cached factorisations are dropped) and of nn objects: every representation,
``PVector``, ``FVector``, ``LayerCollection``. ``torch.load(weights_only=True)`` refuses these
Python objects (they are not plain tensors); that is documented in docs/ops_api.md and checked
here, with the ``weights_only=False`` call that loads them.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeo_ops.nn import (
    FIM,
    LayerCollection,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    PVector,
)
from nngeo_ops.ops import (
    AppendColumn,
    BlockDiag,
    Dense,
    Diagonal,
    Eigen,
    Identity,
    Kronecker,
    LowRank,
    Permutation,
    ScaledIdentity,
)

F64 = torch.float64


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=F64)
    return (B @ B.mT + (B @ B.mT).mT) / (2 * n) + torch.eye(n, dtype=F64)


def _round_trip(obj, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _nodes():
    G, A = _spd(3, 0), _spd(5, 1)
    P = AppendColumn(3, 4, dtype=F64)
    K = Kronecker(Dense(G, psd=True), Dense(A, psd=True))
    Q = torch.linalg.qr(torch.randn(15, 15, dtype=F64))[0]
    U = torch.randn(15, 2, dtype=F64)
    return {
        "dense": Dense(_spd(15, 2), psd=True),
        "diagonal": Diagonal(torch.rand(15, dtype=F64) + 0.5),
        "scaled identity": ScaledIdentity(2.0, 15, dtype=F64),
        "lowrank + shift": LowRank(U) + Identity(15),
        "eigen": Eigen(Q, torch.rand(15, dtype=F64) + 0.5),
        "damped kronecker": K + 0.1 * Identity(15),
        "permuted kronecker": 3.0 * (P.T @ K @ P) + 0.2 * Identity(15),
        "permutation congruence": Permutation(torch.randperm(15), dtype=F64).T @ Dense(_spd(15, 3)),
        "blockdiag": BlockDiag([Dense(_spd(7, 4), psd=True), Diagonal(torch.ones(8, dtype=F64))]),
        "inverse": (K + Identity(15)).inv(),
        "power": K.pow(0.5),
    }


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", list(_nodes()))
def test_node_round_trip_after_a_solve(name, how):
    op = _nodes()[name]
    b = torch.randn(15, dtype=F64)
    x = op.solve(b)  # fills the compiled cache (closures) and the factorisation cache
    op.diag()
    back = _round_trip(op, how)
    assert type(back) is type(op) and str(back) == str(op) and back.shape == op.shape
    torch.testing.assert_close(back @ b, op @ b)
    torch.testing.assert_close(back.solve(b), x)
    torch.testing.assert_close(back.to_dense(), op.to_dense())


def test_weights_only_load_is_refused_for_nodes():
    buf = io.BytesIO()
    torch.save(Dense(_spd(4, 0)), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        torch.load(buf, weights_only=True)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 5, dtype=F64), torch.randint(0, 3, (8,))
    return model, DataLoader(TensorDataset(x, y), batch_size=4)


REPRS = [
    PMatDense,
    PMatDiag,
    PMatBlockDiag,
    PMatKFAC,
    PMatEKFAC,
    PMatLowRank,
    PMatImplicit,
    PMatQuasiDiag,
]


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("cls", REPRS, ids=[c.__name__ for c in REPRS])
def test_representation_round_trip_after_a_solve(setup, cls, how):
    model, loader = setup
    F = FIM(model, loader, cls, progress=False)
    v = PVector.from_model(model).detach()
    F.mv(v)
    x = F.solve(v, regul=0.1)
    back = _round_trip(F, how)
    assert type(back) is cls
    torch.testing.assert_close(back.mv(v).to_torch(), F.mv(v).to_torch())
    torch.testing.assert_close(back.solve(v, regul=0.1).to_torch(), x.to_torch())


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_vectors_and_layer_collections_round_trip(setup, how):
    model, loader = setup
    lc = LayerCollection.from_model(model)
    v = PVector.from_model(model).detach()
    lc2, v2 = _round_trip(lc, how), _round_trip(v, how)
    assert lc2 == lc
    torch.testing.assert_close(v2.to_torch(), v.to_torch())
    from nngeo_ops.nn import FVector

    fv = FVector(torch.randn(3, 8, dtype=F64))
    torch.testing.assert_close(_round_trip(fv, how).to_torch(), fv.to_torch())
