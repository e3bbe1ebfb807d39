"""Clear errors on bad input; PVector / FVector / LayerCollection behaviour."""

import warnings

import pytest
import torch
from models import loader_of, make
from torch import nn

from nngeo_ops.errors import (
    DTypeDeviceError,
    NNGeoError,
    NonFiniteError,
    ShapeError,
    UnsupportedError,
)
from nngeo_ops.nn import (
    FIM,
    GGN,
    DataError,
    EmpiricalFisher,
    FVector,
    LayerCollection,
    PMatDense,
    PMatDiag,
    PVector,
)


def test_empty_loader():
    model, _ = make("mlp")
    with pytest.raises(DataError, match="no examples"):
        FIM(model, [], PMatDiag, progress=False)
    assert issubclass(DataError, ValueError) and issubclass(DataError, NNGeoError)


def test_n_output_mismatch():
    model, x = make("mlp")
    with pytest.raises(ShapeError, match="n_output=10"):
        FIM(model, loader_of(x), PMatDiag, n_output=10, progress=False)


def test_non_finite_outputs():
    model, x = make("mlp")
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        FIM(model, loader_of(x), PMatDiag, progress=False)


def test_labels_that_do_not_fit():
    model, x = make("mlp")
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        EmpiricalFisher(model, loader_of(x, torch.full((6,), 7)), PMatDiag, progress=False)
    with pytest.raises(ShapeError):
        EmpiricalFisher(
            model, loader_of(x, torch.zeros(6, 2, dtype=torch.long)), PMatDiag, progress=False
        )
    with pytest.raises(DTypeDeviceError):
        EmpiricalFisher(model, loader_of(x, torch.zeros(6)), PMatDiag, progress=False)
    with pytest.raises(ShapeError, match="targets"):  # float targets are class probabilities
        GGN(model, loader_of(x, torch.zeros(6)), nn.CrossEntropyLoss(), PMatDiag, progress=False)
    with pytest.raises(DataError, match="labels"):
        EmpiricalFisher(model, loader_of(x), PMatDiag, progress=False)
    with pytest.raises(ShapeError, match="segmentation_logits"):
        FIM(model, loader_of(x), PMatDiag, variant="segmentation_logits", progress=False)
    with pytest.raises(DataError, match="log-probabilities"):
        FIM(model, loader_of(x), PMatDiag, variant="classif_logsoftmax", progress=False)


def test_unsupported_losses_and_variants():
    model, x = make("mlp")
    with pytest.raises(UnsupportedError, match="L1Loss"):
        GGN(model, loader_of(x), nn.L1Loss(), PMatDiag)
    with pytest.raises(UnsupportedError, match="weight"):
        GGN(model, loader_of(x), nn.CrossEntropyLoss(weight=torch.ones(3)), PMatDiag)
    with pytest.raises(UnsupportedError, match="variant"):
        FIM(model, loader_of(x), PMatDiag, variant="classif_nope")


def test_batchnorm_in_training_mode_warns():
    model, x = make("batchnorm1d")
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        FIM(model, loader_of(x), PMatDiag, progress=False)


def test_progress_bar_can_be_silenced(capsys):
    model, x = make("mlp")
    FIM(model, loader_of(x), PMatDiag, progress=False)
    assert capsys.readouterr().err == ""
    FIM(model, loader_of(x), PMatDiag, progress=True)
    assert "PMatDiag" in capsys.readouterr().err


class _CountingLoader:
    def __init__(self, batches):
        self.batches, self.iters = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.iters += 1  # a DataLoader with workers starts them here
        return iter(self.batches)


def test_each_pass_iterates_the_loader_once(capsys):
    from nngeo_ops.nn import GramMatrix

    model, x = make("mlp")
    loader = _CountingLoader(loader_of(x, sizes=(2, 2)))
    FIM(model, loader, PMatDiag, progress=True)
    assert loader.iters == 1
    assert "/3 " in capsys.readouterr().err  # the bar knows the loader's length
    GramMatrix(model, loader, progress=False)
    assert loader.iters == 2


def test_pvector_roundtrip_and_arithmetic():
    model, x = make("mlp")
    lc = LayerCollection.from_model(model)
    names = [n for n, _ in model.named_parameters()]
    assert [n for e in lc.layers.values() for n in e.param_names] == names
    w = PVector.from_model(model)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(w.to_torch().detach(), flat)
    v = PVector.from_flat(lc, torch.arange(lc.numel(), dtype=torch.float64))
    torch.testing.assert_close(v.to_dict()["2"][1], torch.arange(40, 43, dtype=torch.float64))
    torch.testing.assert_close((2 * v + v - v / 2).to_torch(), 2.5 * v.to_torch())
    torch.testing.assert_close(v.dot(v), (v.to_torch() ** 2).sum())
    torch.testing.assert_close(v.norm(), v.to_torch().norm())
    torch.testing.assert_close((v - v).norm(), torch.tensor(0.0, dtype=torch.float64))
    w0 = w.clone().detach()
    v.copy_to_model(model)
    torch.testing.assert_close(model[2].bias.detach(), torch.arange(40, 43, dtype=torch.float64))
    v.add_to_model(model)
    torch.testing.assert_close(
        model[2].bias.detach(), 2 * torch.arange(40, 43, dtype=torch.float64)
    )
    w0.copy_to_model(model)
    torch.testing.assert_close(PVector.from_model(model).to_torch().detach(), flat)
    with pytest.raises(ShapeError):
        PVector.from_flat(lc, torch.zeros(3))
    other = LayerCollection.from_modules(model, [model[0]])
    with pytest.raises(ShapeError):
        v + PVector.from_flat(other, torch.zeros(other.numel(), dtype=torch.float64))


def test_pvector_from_model_grad_and_merge():
    model, x = make("mlp")
    model(x).sum().backward()
    g = PVector.from_model_grad(model)
    torch.testing.assert_close(
        g.to_torch(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    )
    a = LayerCollection.from_modules(model, [model[2]])
    b = LayerCollection.from_modules(model, [model[0]])
    m = a.merge(b)
    assert list(m.layers) == ["2", "0"] and m.numel() == a.numel() + b.numel()


def test_fvector():
    v = FVector(torch.ones(3, 4))
    torch.testing.assert_close((v + 2 * v).to_torch(), 3 * torch.ones(3, 4))
    assert v.dot(v) == 12
    with pytest.raises(ShapeError):
        v + FVector(torch.ones(2, 4))


def test_dense_from_dataloader_with_shuffle_free_batches():
    model, x = make("mlp")
    ds = torch.utils.data.TensorDataset(x)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F = FIM(model, loader, PMatDense, progress=False)
    assert F.to_torch().shape == (43, 43)


class _Borrower(nn.Module):
    """Applies another module's weight itself (kept in a list so that it is not a submodule)."""

    def __init__(self, lender):
        super().__init__()
        self.lender = [lender]

    def forward(self, x):
        return x @ self.lender[0].weight.T


class _BorrowingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = _Borrower(self.a)  # a sibling of a, not an ancestor
        self.c = nn.Linear(4, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(x)))


def test_parameters_applied_by_a_sibling_module_get_a_clear_error_and_a_way_out():
    import groundtruth as gt

    from nngeo_ops.nn import GramMatrix, PMatImplicit, PMatKFAC

    torch.manual_seed(0)
    model = _BorrowingNet().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    for rep in (PMatDense, PMatDiag, PMatKFAC):
        with pytest.raises(
            UnsupportedError, match=r"module a \(Linear\).*never called.*PMatImplicit"
        ):
            FIM(model, loader_of(x), rep, n_output=3, progress=False)
    # the whole-model torch.func paths do not need the hooks
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x), PMatImplicit, progress=False)
    torch.testing.assert_close(F.to_torch(), truth)
    jt = gt.jacobian(model, x)  # (N, C, P)
    K = GramMatrix(model, loader_of(x), progress=False).to_torch()
    torch.testing.assert_close(K, torch.einsum("ncp,mdp->cndm", jt, jt))
    # leaving the borrowed weight out of the collection works with every representation
    lc = LayerCollection.from_modules(model, [model.c])
    D = FIM(model, loader_of(x), PMatDense, layer_collection=lc, progress=False)
    names = ["c.weight", "c.bias"]
    torch.testing.assert_close(D.to_torch(), gt.fim(model, x, "classif_logits", names=names))


def test_a_module_never_called_is_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 3)
            self.spare_head = nn.Linear(4, 3)

        def forward(self, x):
            return self.body(x)

    net = Net().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match=r"spare_head.*never called.*from_modules"):
        FIM(net, loader_of(x), PMatDiag, progress=False)
