"""The finite-width NTK (dense, implicit, cross-kernel, layer subsets) and the linearised network's kernel
regression, against torch.func ground truth computed here (jacrev over functional_call)."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from models import SeqMean, loader_of, make
from torch import nn

from nngeo_ops.errors import DataError, InvalidArgumentError, ShapeError
from nngeo_ops.linalg import lanczos
from nngeo_ops.nn import (
    CrossGramMatrix,
    FMatDense,
    FMatImplicit,
    FVector,
    GramMatrix,
    LayerCollection,
    NTKRegression,
    PFMapDense,
    kernel_regression,
)
from nngeo_ops.ops import MatFree

from .test_jacobian import gt_jacobian


def gt_gram(ja, jb=None):
    """[C, N, C, M] from per-example Jacobians [C, N, P] (and [C, M, P])."""
    jb = ja if jb is None else jb
    return torch.einsum("cnp,dmp->cndm", ja, jb)


class TupleOut(nn.Module):
    """A parameterised module returning two differentiable tensors: the hooks cannot follow one
    cotangent through it (func fallback). With ``one_live=True`` the second element does not
    depend on the parameters, and the hooks follow the first (as for nn.MultiheadAttention)."""

    def __init__(self, one_live=False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.one_live = one_live

    def forward(self, x):
        h = x @ self.w
        return (torch.tanh(h), x if self.one_live else h)


class TupleModel(nn.Module):
    def __init__(self, one_live=False):
        super().__init__()
        self.block = TupleOut(one_live)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.block(x)[0])


def seq_wide():
    """Dense layers over 2 positions, wide enough for the Kronecker-row Gram (R > 1) to be cheaper."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2), SeqMean()).double()
    return model, torch.randn(5, 2, 16, dtype=torch.float64)


def _make(case):
    return seq_wide() if case == "seq_wide" else make(case)


@pytest.mark.parametrize(
    "case", ["mlp", "conv2d", "seq", "seq_wide", "embedding", "residual", "tied", "twice"]
)
@pytest.mark.parametrize("kw", [{}, {"chunk_size": 2}, {"backend": "func"}])
def test_gram_matrix(case, kw):
    model, x = _make(case)
    jt = gt_jacobian(model, x)
    c, n, _ = jt.shape
    K = GramMatrix(model, loader_of(x), progress=False, **kw)
    assert isinstance(K, FMatDense) and K.size() == (c, n, c, n)
    truth = gt_gram(jt)
    torch.testing.assert_close(K.to_torch(), truth)
    # the layout, entry by entry: K[c, n, c', n'] = <∂f_c(x_n)/∂θ, ∂f_c'(x_n')/∂θ>
    assert torch.isclose(K.to_torch()[c - 1, 1, 0, n - 1], jt[c - 1, 1] @ jt[0, n - 1])
    assert K.op.symmetric and K.op.psd


@pytest.mark.parametrize(
    "case, plan",
    [
        ("mlp", {"0": True, "2": True}),  # one position: (G Gᵀ) ⊙ (A Aᵀ)
        ("seq_wide", {"0": True, "2": True}),  # two positions, Kronecker rows still cheaper
        ("conv2d", {"0": False, "2": False, "4": True}),  # many pixels: per-example gradients
    ],
)
def test_which_gram_path_ran(case, plan):
    model, x = _make(case)
    K = GramMatrix(model, loader_of(x), progress=False)
    assert K.generator.backend == "hooks" and K.generator._plan == plan


def test_func_fallback_when_hooks_cannot_follow():
    torch.manual_seed(0)
    model, x = TupleModel().double(), torch.randn(5, 4, dtype=torch.float64)
    K = GramMatrix(model, loader_of(x), progress=False)
    assert K.generator.backend == "func"
    torch.testing.assert_close(K.to_torch(), gt_gram(gt_jacobian(model, x)))


def test_hooks_follow_a_tuple_output_with_one_differentiable_tensor():
    torch.manual_seed(0)
    model, x = TupleModel(one_live=True).double(), torch.randn(5, 4, dtype=torch.float64)
    K = GramMatrix(model, loader_of(x), progress=False)
    assert K.generator.backend == "hooks"
    torch.testing.assert_close(K.to_torch(), gt_gram(gt_jacobian(model, x)))


def test_dense_operations():
    model, x = make("conv2d")
    truth4 = gt_gram(gt_jacobian(model, x))
    c, n = truth4.shape[:2]
    truth = truth4.reshape(c * n, c * n)
    K = GramMatrix(model, loader_of(x), progress=False)
    torch.testing.assert_close(K.trace(), truth.trace())
    torch.testing.assert_close(K.diag(), truth.diagonal().view(c, n))
    torch.testing.assert_close(K.frobenius_norm(), torch.linalg.norm(truth))
    evals, evecs = K.get_eigendecomposition()
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(truth))
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, truth)
    torch.testing.assert_close(K.eigh().to_dense(), truth)
    v = FVector(torch.randn(c, n, dtype=torch.float64))
    kv = K @ v
    assert isinstance(kv, FVector) and kv.size() == (c, n)
    torch.testing.assert_close(kv.to_torch().reshape(-1), truth @ v.to_torch().reshape(-1))
    torch.testing.assert_close(K.mv(v.to_torch()), kv.to_torch())
    torch.testing.assert_close(
        K.vTMv(v), v.to_torch().reshape(-1) @ truth @ v.to_torch().reshape(-1)
    )
    lam = 0.1
    eye = torch.eye(c * n, dtype=torch.float64)
    sol = K.solve(v, regul=lam)
    torch.testing.assert_close(
        sol.to_torch().reshape(-1), torch.linalg.solve(truth + lam * eye, v.to_torch().reshape(-1))
    )
    torch.testing.assert_close(
        K.inverse(regul=lam).to_torch().reshape(c * n, -1), torch.linalg.inv(truth + lam * eye)
    )
    block = torch.randn(c * n, 3, dtype=torch.float64)
    torch.testing.assert_close(
        K.solve(block, regul=lam), torch.linalg.solve(truth + lam * eye, block)
    )
    torch.testing.assert_close((2.0 * K - K).to_torch(), truth4)
    torch.testing.assert_close(
        K.solve(K, regul=lam).to_torch().reshape(c * n, -1),
        torch.linalg.solve(truth + lam * eye, truth),
    )
    J = PFMapDense(K.generator, examples=loader_of(x))
    torch.testing.assert_close((K @ J).to_torch(), torch.einsum("cndm,dmp->cnp", truth4, J.data))
    torch.testing.assert_close(K.add_identity(lam).to_torch().reshape(c * n, -1), truth + lam * eye)


def test_implicit_ntk():
    model, x = make("mlp")
    truth4 = gt_gram(gt_jacobian(model, x))
    c, n = truth4.shape[:2]
    truth = truth4.reshape(c * n, c * n)
    K = GramMatrix(model, loader_of(x), representation=FMatImplicit, progress=False)
    assert isinstance(K.op, MatFree) and K.op.symmetric and K.op.psd and str(K.op) == "J·Jᵀ"
    v = torch.randn(c * n, 2, dtype=torch.float64)
    torch.testing.assert_close(K.op @ v, truth @ v)
    torch.testing.assert_close(K.to_torch(), truth4)
    torch.testing.assert_close(K.diag(), truth.diagonal().view(c, n))
    torch.testing.assert_close(K.trace(), truth.trace())
    dense_evals = torch.linalg.eigvalsh(truth)
    evals, evecs = lanczos(K.op, 3, num_iter=c * n, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(evals, dense_evals[-3:])
    top = sla.eigsh(K.op.to_scipy(), k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), dense_evals[-2:].numpy(), rtol=1e-8)
    lam = 0.5
    sol = K.solve(FVector(v[:, 0].view(c, n)), regul=lam)
    torch.testing.assert_close(
        sol.to_torch().reshape(-1),
        torch.linalg.solve(truth + lam * torch.eye(c * n, dtype=torch.float64), v[:, 0]),
        rtol=1e-6,
        atol=1e-8,
    )


def test_layer_subset():
    model, x = make("conv2d")
    lc = LayerCollection.from_modules(model, [model[0], model[4]])
    names = ["0.weight", "0.bias", "4.weight", "4.bias"]
    truth = gt_gram(gt_jacobian(model, x, names=names))
    K = GramMatrix(model, loader_of(x), layer_collection=lc, progress=False)
    torch.testing.assert_close(K.to_torch(), truth)
    Ki = GramMatrix(
        model, loader_of(x), layer_collection=lc, representation=FMatImplicit, progress=False
    )
    torch.testing.assert_close(Ki.diag(), K.diag())


def test_cross_kernel():
    model, x = make("mlp")
    xt = torch.randn(4, 4, dtype=torch.float64)
    ja, jb = gt_jacobian(model, xt), gt_jacobian(model, x)
    for kw in ({}, {"chunk_size": 3}):
        Kx = CrossGramMatrix(model, loader_of(xt, sizes=(1,)), loader_of(x), progress=False, **kw)
        assert Kx.size() == (3, 4, 3, 6) and not Kx.op.symmetric
        torch.testing.assert_close(Kx.to_torch(), gt_gram(ja, jb))
    v = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(Kx.mv(v), torch.einsum("cndm,dm->cn", gt_gram(ja, jb), v))
    assert Kx.T.size() == (3, 6, 3, 4)
    torch.testing.assert_close(Kx.T.to_torch(), gt_gram(jb, ja))
    with pytest.raises(ShapeError, match="square"):
        Kx.solve(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match="square"):
        Kx.trace()


@pytest.mark.parametrize("representation", [FMatDense, FMatImplicit])
def test_kernel_regression_is_the_linearised_network(representation):
    model, x = make("mlp")
    xt = torch.randn(4, 4, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)
    lam = 0.3
    # dense ground truth: f_lin(x*) = f0(x*) + K(x*, X)(K + λI)⁻¹(Y − f0(X))
    j, jt = gt_jacobian(model, x), gt_jacobian(model, xt)
    k = gt_gram(j).reshape(18, 18)
    kx = gt_gram(jt, j).reshape(12, 18)
    r = (y - model(x).detach()).T.reshape(-1)
    alpha = torch.linalg.solve(k + lam * torch.eye(18, dtype=torch.float64), r)
    truth = model(xt).detach() + (kx @ alpha).view(3, 4).T
    # the same predictions from the primal problem of the linearised network
    jf, jtf = j.reshape(18, -1), jt.reshape(12, -1)
    delta = torch.linalg.solve(
        jf.T @ jf + lam * torch.eye(jf.shape[1], dtype=torch.float64), jf.T @ r
    )
    torch.testing.assert_close(truth, model(xt).detach() + (jtf @ delta).view(3, 4).T)

    reg = NTKRegression(
        model, loader_of(x, y), regul=lam, representation=representation, progress=False
    )
    tol = {} if representation is FMatDense else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(reg.alpha.reshape(-1), alpha, **tol)
    torch.testing.assert_close(reg.delta.to_torch(), delta, **tol)
    for method in ("kernel", "primal"):
        torch.testing.assert_close(reg.predict(loader_of(xt), method=method), truth, **tol)
    # targets given explicitly, as a tensor or an FVector; plain (uncentred) kernel regression
    pred = kernel_regression(
        model, loader_of(x), loader_of(xt), targets=y, regul=lam, progress=False
    )
    torch.testing.assert_close(pred, truth)
    reg = NTKRegression(
        model, loader_of(x), targets=FVector(y.T), regul=lam, centered=False, progress=False
    )
    plain = kx @ torch.linalg.solve(k + lam * torch.eye(18, dtype=torch.float64), y.T.reshape(-1))
    torch.testing.assert_close(reg.predict(loader_of(xt)), plain.view(3, 4).T)


def test_regression_with_class_labels():
    model, x = make("mlp")
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    a = NTKRegression(model, loader_of(x, labels), regul=0.1, progress=False)
    b = NTKRegression(model, loader_of(x), targets=onehot, regul=0.1, progress=False)
    torch.testing.assert_close(a.alpha, b.alpha)


def test_bad_input():
    model, x = make("mlp")
    with pytest.raises(DataError, match="no examples"):
        GramMatrix(model, [], progress=False)
    with pytest.raises(DataError, match="no examples"):
        CrossGramMatrix(model, loader_of(x), [], progress=False)
    with pytest.raises(InvalidArgumentError, match="no trainable parameter"):
        GramMatrix(nn.Sequential(nn.ReLU(), nn.Flatten()), loader_of(x), progress=False)
    other, _ = make("conv2d")
    with pytest.raises(InvalidArgumentError, match="does not belong"):
        GramMatrix(
            model,
            loader_of(x),
            layer_collection=LayerCollection.from_modules(other, [other[4]]),
            progress=False,
        )
    with pytest.raises(InvalidArgumentError):
        GramMatrix(model, loader_of(x), backend="jax", progress=False)
    # a fully convolutional model: the number of outputs depends on the input length
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 2, 3).double()
    a, b = torch.randn(3, 2, 6, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
    with pytest.raises(ShapeError, match="same outputs"):
        CrossGramMatrix(conv, loader_of(a), loader_of(b), progress=False)
    with pytest.raises(ShapeError):
        GramMatrix(conv, [(a,), (b,)], progress=False)
    with pytest.raises(DataError, match="targets"):
        NTKRegression(model, loader_of(x), progress=False)
    with pytest.raises(ShapeError):
        NTKRegression(
            model, loader_of(x), targets=torch.zeros(6, 2, dtype=torch.float64), progress=False
        )
    with pytest.raises(InvalidArgumentError):
        NTKRegression(
            model,
            loader_of(x),
            targets=torch.zeros(6, 3, dtype=torch.float64),
            regul=-1.0,
            progress=False,
        )
    K = GramMatrix(model, loader_of(x), progress=False)
    with pytest.raises(ShapeError):
        K.mv(torch.zeros(5, dtype=torch.float64))


class LateTuple(nn.Module):
    """Followed by the hooks on batches of 2 and not on a batch of 1 (where its block returns two
    tensors that depend on the parameters): a computation whose later chunk the hooks cannot
    follow."""

    def __init__(self):
        super().__init__()
        self.block = TupleOut(one_live=True)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        self.block.one_live = x.shape[0] != 1
        return self.out(self.block(x)[0])


def test_backend_is_chosen_once_per_computation():
    """The backend is chosen at the first chunk of a computation and kept: a model the hooks cannot
    follow from the first chunk runs on torch.func throughout (and later computations start there);
    a later chunk the hooks cannot follow is an error naming the fix, not a silent start-over."""
    from nngeo_ops.errors import UnsupportedError
    from nngeo_ops.nn import JacobianGenerator

    torch.manual_seed(0)
    model, x = LateTuple().double(), torch.randn(5, 4, dtype=torch.float64)
    gen = JacobianGenerator(model, chunk_size=2, progress=False)
    run = gen.start()
    assert run.backend is None and gen._plan is run.layout
    with pytest.raises(UnsupportedError, match="first chunk of this computation.*backend='func'"):
        gen.get_gram_matrix(loader_of(x))
    assert gen.backend == "hooks"  # the first chunk was followed: nothing silently switched
    func = JacobianGenerator(model, chunk_size=2, progress=False, backend="func")
    k = func.get_gram_matrix(loader_of(x))
    torch.testing.assert_close(k, gt_gram(gt_jacobian(model, x)))
    # a model the hooks never follow: decided at the first chunk, remembered afterwards
    tup = TupleModel().double()
    gen = JacobianGenerator(tup, chunk_size=2, progress=False)
    torch.testing.assert_close(gen.get_gram_matrix(loader_of(x)), gt_gram(gt_jacobian(tup, x)))
    assert gen.backend == "func" and gen.start().backend is None


def test_methods_lent_by_the_upper_layers():
    """JacobianGenerator.jacobian_op, CurvatureGenerator.implicit_op and Jacobian.pfmap are built in
    the layer above the engine and still reachable as methods, with the same results."""
    from nngeo_ops.nn import (
        FIM,
        CurvatureGenerator,
        Jacobian,
        JacobianGenerator,
        PFMapImplicit,
        PMatDense,
    )

    model, x = make("mlp")
    gen = JacobianGenerator(model, progress=False)
    J = gen.jacobian_op(loader_of(x))
    assert isinstance(J, Jacobian)
    torch.testing.assert_close(J.to_torch(), gt_jacobian(model, x))
    assert isinstance(J.pfmap(), PFMapImplicit)
    F = FIM(model, loader_of(x), PMatDense, progress=False)
    assert isinstance(F.generator, CurvatureGenerator)
    op = F.generator.implicit_op(loader_of(x))
    torch.testing.assert_close(op.to_dense(), F.to_torch())
