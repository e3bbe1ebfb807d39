"""The representation methods (PVector in/out) against dense linear algebra on the validated matrix."""

import groundtruth as gt
import pytest
import torch
from models import loader_of, make

from nngeo_ops.errors import ShapeError
from nngeo_ops.nn import (
    FIM,
    LayerCollection,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatEye,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    PVector,
    build_many,
)

ALL = [
    PMatDense,
    PMatDiag,
    PMatBlockDiag,
    PMatKFAC,
    PMatEKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    PMatImplicit,
    PMatEye,
]


@pytest.fixture(scope="module")
def setup():
    model, x = make("mlp")
    return model, x, loader_of(x), gt.fim(model, x, "classif_logits")


@pytest.mark.parametrize("rep", ALL)
def test_methods_agree_with_dense(setup, rep):
    model, x, loader, _ = setup
    F = FIM(model, loader, rep, progress=False)
    D = F.to_torch()
    n = D.shape[0]
    eye = torch.eye(n, dtype=D.dtype)
    torch.testing.assert_close(D, F.get_dense_tensor())
    torch.testing.assert_close(D, D.T)
    v = PVector(F.layer_collection, vector_repr=torch.randn(n, dtype=torch.float64))
    torch.testing.assert_close(F.mv(v).to_torch(), D @ v.to_torch())
    torch.testing.assert_close(F.vTMv(v), v.to_torch() @ D @ v.to_torch())
    lam = 0.3
    torch.testing.assert_close(
        F.solve(v, regul=lam).to_torch(), torch.linalg.solve(D + lam * eye, v.to_torch())
    )
    torch.testing.assert_close(F.inverse(regul=lam).to_torch(), torch.linalg.inv(D + lam * eye))
    root = F.pow(0.5, regul=lam).to_torch()
    torch.testing.assert_close(root @ root, D + lam * eye)
    torch.testing.assert_close(F.trace(), D.trace())
    torch.testing.assert_close(F.frobenius_norm(), D.norm())
    torch.testing.assert_close(F.get_diag(), D.diagonal())
    torch.testing.assert_close((2.5 * F).to_torch(), 2.5 * D)
    torch.testing.assert_close((F * 2.5).to_torch(), 2.5 * D)
    torch.testing.assert_close(F.add_identity(lam).to_torch(), D + lam * eye)
    torch.testing.assert_close(
        (F + lam * PMatEye(layer_collection=F.layer_collection)).to_torch(), D + lam * eye
    )
    evals, evecs = F.get_eigendecomposition()
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, D)


def test_sum_of_representations(setup):
    model, x, loader, truth = setup
    A = FIM(model, loader, PMatKFAC, progress=False)
    B = FIM(model, loader, PMatDiag, progress=False)
    S = A + B
    torch.testing.assert_close(S.to_torch(), A.to_torch() + B.to_torch())
    torch.testing.assert_close((A - B).to_torch(), A.to_torch() - B.to_torch())
    with pytest.raises(ShapeError):
        other = LayerCollection.from_modules(model, [model[0]])
        A + FIM(model, loader, PMatDiag, layer_collection=other, progress=False)


def test_representations_agree(setup):
    model, x, loader, truth = setup
    dense, diag, block, kfac = build_many(
        FIM(model, loader, PMatEye).generator,
        loader,
        [PMatDense, PMatDiag, PMatBlockDiag, PMatKFAC],
    )
    torch.testing.assert_close(dense.to_torch(), truth)
    torch.testing.assert_close(diag.get_diag(), dense.get_diag())
    torch.testing.assert_close(block.get_diag(), dense.get_diag())
    # the last layer of an MLP: A ⊗ G has the exact diagonal of G only on average; the KFAC
    # trace of a layer is tr(A)·tr(G), checked against the dense trace where it must hold
    quasi = FIM(model, loader, PMatQuasiDiag, progress=False)
    torch.testing.assert_close(quasi.get_diag(), truth.diagonal())
    lc = dense.layer_collection
    sl = lc.layer_slices()["2"]
    q = quasi.to_torch()[sl, sl]
    n_w = 15
    # bias o couples with W[o, :] exactly as in the dense matrix, and nothing else couples
    t = truth[sl, sl]
    for o in range(3):
        torch.testing.assert_close(q[n_w + o, o * 5 : o * 5 + 5], t[n_w + o, o * 5 : o * 5 + 5])
    assert q[:n_w, :n_w].count_nonzero() == n_w


def test_damped_kfac_solve_uses_eigen_path_and_is_exact(setup):
    model, x, loader, _ = setup
    F = FIM(model, loader, PMatKFAC, progress=False)
    lam = 1e-3
    expr = F.add_identity(lam).op
    assert "Eig" in expr.compile().explain()
    D = F.to_torch()
    v = torch.randn(D.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        F.solve(v, regul=lam), torch.linalg.solve(D + lam * torch.eye(len(D), dtype=D.dtype), v)
    )


def test_pi_damping_is_an_explicit_option(setup):
    model, x, loader, _ = setup
    F = FIM(model, loader, PMatKFAC, progress=False)
    lam = 0.1
    v = torch.randn(F.layer_collection.numel(), dtype=torch.float64)
    exact = F.solve(v, regul=lam)
    pi = F.solve(v, regul=lam, damping="pi")
    assert not torch.allclose(exact, pi)
    # closed form on the last layer: (A + π√λ I) ⊗ (G + √λ/π I), π² = (tr A / dA) / (tr G / dG)
    A, G = F.get_factors("2")
    p = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
    s = lam**0.5
    damped = torch.kron(
        G + s / p * torch.eye(3, dtype=G.dtype), A + p * s * torch.eye(6, dtype=A.dtype)
    )
    inv = F.inverse(regul=lam, damping="pi").to_torch()
    sl = F.layer_collection.layer_slices()["2"]
    n_out, n_in = 3, 5
    idx = [o * 6 + i for o in range(n_out) for i in range(n_in)] + [o * 6 + 5 for o in range(n_out)]
    torch.testing.assert_close(inv[sl, sl], torch.linalg.inv(damped)[idx][:, idx])


def test_kfac_factor_order_documented(setup):
    model, x, loader, _ = setup
    F = FIM(model, loader, PMatKFAC, progress=False)
    A, G = F.get_factors("2")
    assert A.shape == (6, 6) and G.shape == (
        3,
        3,
    )  # A over inputs (+1 for the bias), G over outputs


def test_nngeometry_readme_ewc(setup):
    """NNGeometry's README: F = FIM(model, loader, PMatDiag, n_output=10); F.vTMv(w - w_a)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    model = model.double()
    x = torch.randn(20, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (20,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    truth = gt.fim(model, x, "classif_logits")
    w_a = PVector.from_model(model).clone().detach()
    for rep in (PMatDiag, PMatKFAC):
        F = FIM(model=model, loader=loader, representation=rep, n_output=10, progress=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        w = PVector.from_model(model)
        regularizer = F.vTMv(w - w_a)
        d = (w - w_a).to_torch().detach()
        expected = d @ F.to_torch() @ d
        torch.testing.assert_close(regularizer.detach(), expected)
        regularizer.backward()  # the EWC penalty is differentiable in the current weights
        assert model[0].weight.grad is not None
        model.zero_grad()
        w_a.copy_to_model(model)
    F = FIM(model=model, loader=loader, representation=PMatDiag, n_output=10, progress=False)
    torch.testing.assert_close(F.get_diag(), truth.diagonal())


def test_a_new_representation_follows_the_protocol(setup):
    """A class written against the documented Representation protocol (only ``accumulators`` and
    ``data_from``, everything else by default) is gathered by build_many in the shared pass and
    built alone; classes not gathered from a pass are refused with a clear error."""
    from nngeo_ops.errors import UnsupportedError
    from nngeo_ops.nn.engine.accumulators import DiagAcc
    from nngeo_ops.nn.pspace.base import PMatAbstract, Representation
    from nngeo_ops.ops import Diagonal

    class PMatTraceOnly(PMatAbstract):  # tr(F)/P · I, from the diagonal statistics
        def __init__(self, generator, data=None, examples=None):
            if data is None:
                data = self.data_from_examples(generator, examples)
            self.data = data
            n = generator.layer_collection.numel()
            super().__init__(generator.layer_collection, Diagonal(data.expand(n)), generator)

        @classmethod
        def accumulators(cls, generator):
            return [DiagAcc(generator.layer_collection.layers)]

        @classmethod
        def data_from(cls, generator, accs):
            return torch.cat(list(accs[0].value.values())).mean().reshape(1)

    model, x, loader, truth = setup
    assert issubclass(PMatTraceOnly, Representation)
    gen = FIM(model, loader, PMatEye).generator
    mean, dense = build_many(gen, loader, [PMatTraceOnly, PMatDense])
    torch.testing.assert_close(mean.data, truth.diagonal().mean().reshape(1))
    torch.testing.assert_close(dense.to_torch(), truth)
    alone = FIM(model, loader, PMatTraceOnly, progress=False)
    torch.testing.assert_close(alone.trace(), truth.trace())
    for refused in (PMatImplicit, PMatEye, int):
        with pytest.raises(UnsupportedError, match="shared pass"):
            build_many(gen, loader, [PMatDiag, refused])


@pytest.mark.parametrize("rep", [PMatDiag, PMatKFAC, PMatEKFAC, PMatImplicit])
def test_damped_is_the_public_node_that_solve_compiles(setup, rep):
    """``F.damped(λ)`` is ``F + λI`` of the ground truth, one node per λ (reused, so its compiled
    factorisation is too), and bad dampings are refused by name."""
    from nngeo_ops.errors import ArgumentTypeError, NonFiniteError

    model, x, loader, fisher = setup
    F = FIM(model, loader, rep, progress=False)
    D = F.to_torch()
    lam = 0.25
    node = F.damped(lam)
    torch.testing.assert_close(node.to_dense(), D + lam * torch.eye(D.shape[0], dtype=D.dtype))
    assert F.damped(lam) is node
    assert F.damped(0) is F.op
    if rep is PMatDiag:  # the matrix itself, against the torch.func Fisher
        torch.testing.assert_close(D, torch.diag(torch.diagonal(fisher)))
    if rep is PMatImplicit:
        torch.testing.assert_close(D, fisher)
    with pytest.raises(NonFiniteError, match="finite damping"):
        F.damped(float("nan"))
    with pytest.raises(ArgumentTypeError, match="must be a number"):
        F.damped("1e-3")


@pytest.mark.parametrize("regul", [1e-3, 1, torch.tensor(0.5, dtype=torch.float64)])
def test_first_damped_diagonal_solve_is_exact_explained_and_cached(setup, regul):
    """The damped diagonal solve ``(diag(F) + λI)⁻¹ v`` of a fresh representation against the
    torch.func Fisher's diagonal (float64): its node is ``diag+λ·I`` (a number λ builds ``λ·I``
    once, as ``λ * Identity`` would), folded to one diagonal by the canonical sum, solved by an
    elementwise division, and the second solve reuses the compiled form."""
    from nngeo_ops.ops import Identity

    model, x, loader, fisher = setup
    F = FIM(model, loader, PMatDiag, progress=False)
    n = fisher.shape[0]
    lam = float(regul)
    dense = torch.diag(torch.diagonal(fisher)) + lam * torch.eye(n, dtype=torch.float64)
    v = PVector(F.layer_collection, vector_repr=torch.randn(n, dtype=torch.float64))
    x1 = F.solve(v, regul=regul)
    torch.testing.assert_close(x1.to_torch(), torch.linalg.solve(dense, v.to_torch()))
    node = F.damped(regul)
    spelled = F.op + regul * Identity(n, dtype=F.op.dtype)  # the node as a user spells it
    assert str(node) == str(spelled) == ("diag+I" if lam == 1 else f"diag+{lam:.4g}·I")
    assert [type(t) for t in node.terms] == [type(t) for t in spelled.terms]
    assert node.terms[1].c == spelled.terms[1].c and not node.terms[1].flexible
    if torch.is_tensor(regul):  # one node per numeric λ only: a tensor may carry a gradient
        node.solve(v.to_torch())
    c = node.compiled()
    text = c.explain()
    assert f"[canonical sum] {spelled}  →  diag" in text
    assert "⇒  elementwise division" in text
    x2 = F.solve(v, regul=regul)
    torch.testing.assert_close(x2.to_torch(), x1.to_torch(), rtol=0, atol=0)
    if not torch.is_tensor(regul):
        assert F.damped(regul) is node and node.compiled() is c and len(c.routines) == 1
