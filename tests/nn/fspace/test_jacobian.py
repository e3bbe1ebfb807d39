"""Jacobian operators (JVP / VJP / materialised), PFMaps and pushforwards against torch.func.

The ground truth is computed here, independently of nngeo_ops: ``jacrev`` over ``functional_call`` on
the flat vector of the chosen parameters, rearranged to NNGeometry's [C, N, P] layout.
"""

import groundtruth as gt
import pytest
import torch
import torch.nn.functional as Fn
from models import loader_of, make
from torch import nn
from torch.func import jacrev

from nngeo_ops.errors import (
    DataError,
    InvalidArgumentError,
    NNGeoError,
    ShapeError,
    UnsupportedError,
)
from nngeo_ops.nn import (
    GGN,
    FVector,
    Jacobian,
    JacobianGenerator,
    LayerCollection,
    PFMapDense,
    PFMapImplicit,
    PMatDense,
    PVector,
    mapTMmap,
)
from nngeo_ops.ops import Dense, Product

CASES = ["mlp", "conv2d", "embedding", "tied", "twice"]


def gt_jacobian(model, x, names=None, post=None):
    """[C, N, P]: ∂ post(model(x))[n, c] / ∂θ_p, θ = the named parameters (all trainable by default)."""
    f0, flat0 = gt.flat_fn(model, names)  # functional_call, each (module, attribute) swapped once

    def f(flat):
        out = f0(flat, x)
        return out if post is None else post(out)

    j = jacrev(f)(flat0)
    n = x.shape[0]
    return j.reshape(n, -1, flat0.numel()).permute(1, 0, 2)


def _flat(j):
    return j.reshape(-1, j.shape[-1])


@pytest.mark.parametrize("case", CASES)
def test_products_and_dense(case):
    model, x = make(case)
    jt = gt_jacobian(model, x)
    c, n, p = jt.shape
    J = Jacobian(model, loader_of(x), progress=False)
    assert J.shape == (c * n, p) and J.size() == (c, n, p)
    assert (J.n_output, J.n_examples) == (c, n)
    v = torch.randn(p, 3, dtype=torch.float64)
    u = torch.randn(c * n, 2, dtype=torch.float64)
    torch.testing.assert_close(J @ v, _flat(jt) @ v)
    torch.testing.assert_close(J @ v[:, 0], _flat(jt) @ v[:, 0])
    torch.testing.assert_close(J.T @ u, _flat(jt).T @ u)
    torch.testing.assert_close(J.T @ u[:, 0], _flat(jt).T @ u[:, 0])
    torch.testing.assert_close(J.to_torch(), jt)
    # the documented row order: to_dense() is to_torch() flattened output-major
    torch.testing.assert_close(J.to_dense().view(c, n, p), jt)
    torch.testing.assert_close(J.outputs, model(x).detach().reshape(n, -1).T)


def test_chunked_passes_and_func_backend():
    model, x = make("mlp")
    jt = gt_jacobian(model, x)
    for kw in ({"chunk_size": 2}, {"backend": "func"}, {"chunk_size": 1, "backend": "func"}):
        J = Jacobian(model, loader_of(x), progress=False, **kw)
        v = torch.randn(J.shape[1], 2, dtype=torch.float64)
        torch.testing.assert_close(J @ v, _flat(jt) @ v)
        torch.testing.assert_close(J.to_torch(), jt)


def test_vectors():
    model, x = make("mlp")
    jt = gt_jacobian(model, x)
    c, n, p = jt.shape
    J = Jacobian(model, loader_of(x), progress=False)
    v = PVector(J.layer_collection, vector_repr=torch.randn(p, dtype=torch.float64))
    fv = J @ v
    assert isinstance(fv, FVector) and fv.size() == (c, n)
    torch.testing.assert_close(fv.to_torch(), jt @ v.to_torch())
    u = FVector(torch.randn(c, n, dtype=torch.float64))
    pv = J.vjp(u)
    assert isinstance(pv, PVector)
    torch.testing.assert_close(pv.to_torch(), torch.einsum("cnp,cn->p", jt, u.to_torch()))
    # adjointness through the public vector API
    torch.testing.assert_close(fv.dot(u), v.dot(pv))
    with pytest.raises(ShapeError):
        J.vjp(FVector(torch.zeros(c + 1, n, dtype=torch.float64)))


def test_function_and_layer_subset():
    model, x = make("mlp")
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    # any function of the model: the per-example loss, C = 1
    loader = loader_of(x, y)
    J = Jacobian(
        model,
        loader,
        function=lambda a, b: Fn.cross_entropy(model(a), b, reduction="none"),
        progress=False,
    )
    jt = gt_jacobian(model, x, post=lambda o: Fn.cross_entropy(o, y, reduction="none"))
    assert J.size() == (1, 6, jt.shape[2])
    torch.testing.assert_close(J.to_torch(), jt)
    u = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(J.T @ u, jt[0].T @ u)
    # a subset of layers
    lc = LayerCollection.from_modules(model, [model[2]])
    J = Jacobian(model, loader_of(x), layer_collection=lc, progress=False)
    jt = gt_jacobian(model, x, names=["2.weight", "2.bias"])
    v = torch.randn(lc.numel(), dtype=torch.float64)
    torch.testing.assert_close(J @ v, _flat(jt) @ v)
    torch.testing.assert_close(J.to_torch(), jt)


def test_lazy_gauss_newton():
    model, x = make("conv2d")
    jt = _flat(gt_jacobian(model, x))
    J = Jacobian(model, loader_of(x), progress=False)
    m = jt.shape[0]
    r = torch.randn(m, m, dtype=torch.float64)
    H = Dense(r @ r.T / m, psd=True, name="H")
    G = J.T @ H @ J
    assert isinstance(G, Product) and str(G) == "Jᵀ·H·J"
    assert G.symmetric and G.psd and G.shape == (jt.shape[1],) * 2
    v = torch.randn(jt.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(G @ v, jt.T @ (H.M @ (jt @ v)))
    # the GGN of a summed MSE loss is Jᵀ (2I) J: agrees with the representation built by GGN
    F = GGN(model, loader_of(x), nn.MSELoss(reduction="sum"), PMatDense, progress=False)
    GN = J.T @ Dense(2.0 * torch.eye(m, dtype=torch.float64), psd=True, name="H") @ J
    torch.testing.assert_close(GN.to_dense(), F.to_torch())


def test_pfmaps_and_mapTMmap():
    model, x = make("mlp")
    jt = gt_jacobian(model, x)
    c, n, p = jt.shape
    gen = JacobianGenerator(model, progress=False)
    dense = PFMapDense(gen, examples=loader_of(x))
    implicit = PFMapImplicit(gen, examples=loader_of(x))
    r = torch.randn(p, p, dtype=torch.float64)
    F = Dense(r @ r.T / p, psd=True, name="F")
    v = PVector(gen.layer_collection, vector_repr=torch.randn(p, dtype=torch.float64))
    u = FVector(torch.randn(c, n, dtype=torch.float64))
    truth = _flat(jt) @ F.M @ _flat(jt).T
    for J in (dense, implicit, implicit.op):
        if not isinstance(J, Jacobian):
            assert J.size() == (c, n, p)
            torch.testing.assert_close(J.to_torch(), jt)
            torch.testing.assert_close(J.jvp(v).to_torch(), jt @ v.to_torch())
            torch.testing.assert_close(
                J.vjp(u).to_torch(), torch.einsum("cnp,cn->p", jt, u.to_torch())
            )
        push = mapTMmap(F, J)
        assert push.size() == (c, n, c, n) and push.op.psd
        torch.testing.assert_close(push.to_torch().reshape(c * n, c * n), truth)
        diag = truth.diagonal().view(c, n)
        torch.testing.assert_close(mapTMmap(F, J, reduction="diag"), diag)
        torch.testing.assert_close(mapTMmap(F, J, reduction="sum"), diag.sum(0))
    # a parameter-space representation pushes forward the same way
    P = GGN(model, loader_of(x), nn.MSELoss(reduction="sum"), PMatDense, progress=False)
    torch.testing.assert_close(
        mapTMmap(P, dense).to_torch().reshape(c * n, c * n),
        _flat(jt) @ P.to_torch() @ _flat(jt).T,
    )
    # ... also as NNGeometry's method F.mapTMmap(J)
    pushed = _flat(jt) @ P.to_torch() @ _flat(jt).T
    torch.testing.assert_close(P.mapTMmap(dense).to_torch().reshape(c * n, c * n), pushed)
    torch.testing.assert_close(P.mapTMmap(implicit, "diag"), pushed.diagonal().view(c, n))
    with pytest.raises(ShapeError):
        mapTMmap(Dense(torch.eye(p + 1, dtype=torch.float64)), dense)


@pytest.mark.mutates_model  # changes the parameters to check the snapshot
def test_loader_must_not_change():
    model, x = make("mlp")
    data = loader_of(x)
    J = Jacobian(model, data, progress=False)
    v = torch.randn(J.shape[1], dtype=torch.float64)
    before = J @ v
    data.reverse()  # what a shuffling loader would do between passes
    with pytest.raises(DataError, match="same order"):
        J @ v
    data.reverse()
    data[0] = (data[0][0].flip(0),)
    with pytest.raises(DataError):
        J.T @ torch.randn(J.shape[0], dtype=torch.float64)
    data[0] = (data[0][0].flip(0),)
    torch.testing.assert_close(J @ v, before)
    # products use the parameters of construction; to_torch() refuses once they changed
    with torch.no_grad():
        model[0].weight.add_(1.0)
    torch.testing.assert_close(J @ v, before)
    with pytest.raises(DataError, match="parameters changed"):
        J.to_torch()


def test_bad_input():
    model, x = make("mlp")
    with pytest.raises(DataError, match="no examples"):
        Jacobian(model, [], progress=False)
    with pytest.raises(InvalidArgumentError, match="no trainable parameter"):
        Jacobian(nn.Sequential(nn.Tanh()), loader_of(x), progress=False)
    frozen = make("mlp")[0].requires_grad_(False)
    with pytest.raises(InvalidArgumentError):
        Jacobian(frozen, loader_of(x), progress=False)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 3)).double()
    lc = LayerCollection.from_modules(other, [other[3]])
    with pytest.raises(InvalidArgumentError, match="does not belong"):
        Jacobian(model, loader_of(x), layer_collection=lc, progress=False)
    with pytest.raises(UnsupportedError):
        Jacobian(model, loader_of(x), function=lambda a: (model(a),), progress=False)
    with pytest.raises(ShapeError):
        Jacobian(model, loader_of(x), function=lambda a: model(a).sum(), progress=False)
    with pytest.raises(InvalidArgumentError):
        Jacobian(model, loader_of(x), chunk_size=0, progress=False)
    J = Jacobian(model, loader_of(x), progress=False)
    with pytest.raises(ShapeError):
        J @ torch.zeros(J.shape[1] + 1, dtype=torch.float64)
    with pytest.raises(NNGeoError):
        J.jvp(PVector(lc, vector_repr=torch.zeros(lc.numel(), dtype=torch.float64)))


def test_operator_syntax_with_parameter_and_function_space_matrices():
    from nngeo_ops.nn import FIM, GramMatrix, PMatKFAC

    model, x = make("mlp")
    jt = _flat(gt_jacobian(model, x))
    J = Jacobian(model, loader_of(x), progress=False)
    F = FIM(model, loader_of(x), PMatKFAC, progress=False)
    fd = F.to_torch()
    push = J @ F @ J.T  # J F Jᵀ, lazy: the PMat acts as its operator
    assert isinstance(push, Product) and push.shape == (jt.shape[0],) * 2 and push.psd
    u = torch.randn(jt.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(push @ u, jt @ fd @ jt.T @ u)
    torch.testing.assert_close((F @ J.T) @ u, fd @ jt.T @ u)
    K = GramMatrix(model, loader_of(x), progress=False)
    pull = J.T @ K @ J  # Jᵀ K J in parameter space
    assert isinstance(pull, Product) and pull.psd
    v = torch.randn(jt.shape[1], dtype=torch.float64)
    torch.testing.assert_close(pull @ v, jt.T @ (jt @ jt.T) @ jt @ v)
    # products of representations stay lazy expressions over the same layer collection
    torch.testing.assert_close((F @ F).to_torch(), fd @ fd)
    torch.testing.assert_close(F @ v, fd @ v)
