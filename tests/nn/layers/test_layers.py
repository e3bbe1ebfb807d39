"""Every layer kind × the exact representations, against the dense torch.func ground truth."""

import groundtruth as gt
import pytest
import torch
from models import CASES, loader_of, make

from nngeo_ops.nn import (
    FIM,
    LayerCollection,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatLowRank,
    PVector,
)


def _blocks_of(dense, lc):
    out = torch.zeros_like(dense)
    for sl in lc.layer_slices().values():
        out[sl, sl] = dense[sl, sl]
    return out


@pytest.mark.parametrize("case", CASES)
def test_exact_representations_match_torch_func(case):
    model, x = make(case)
    truth = gt.fim(model, x, "classif_logits")
    lc = LayerCollection.from_model(model)
    assert truth.shape == (lc.numel(), lc.numel())
    loader = loader_of(x, sizes=(2, 2))
    dense = FIM(model, loader, PMatDense, n_output=model(x).shape[1], progress=False)
    torch.testing.assert_close(dense.to_torch(), truth)
    diag = FIM(model, loader, PMatDiag, progress=False)
    torch.testing.assert_close(diag.get_diag(), truth.diagonal())
    block = FIM(model, loader, PMatBlockDiag, progress=False)
    torch.testing.assert_close(block.to_torch(), _blocks_of(truth, lc))
    low = FIM(model, loader, PMatLowRank, progress=False)
    torch.testing.assert_close(low.to_torch(), truth)
    impl = FIM(model, loader, PMatImplicit, progress=False)
    v = torch.randn(lc.numel(), 2, dtype=torch.float64)
    torch.testing.assert_close(impl.op @ v, truth @ v)
    w = PVector(lc, vector_repr=v[:, 0])
    torch.testing.assert_close(impl.vTMv(w), v[:, 0] @ truth @ v[:, 0])


def test_frozen_parameters_are_excluded():
    model, x = make("mlp")
    model[0].bias.requires_grad_(False)
    lc = LayerCollection.from_model(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for e in lc.layers.values() for n in e.param_names] == names
    truth = gt.fim(model, x, "classif_logits", names=names)
    F = FIM(model, loader_of(x), PMatDense, progress=False)
    torch.testing.assert_close(F.to_torch(), truth)


def test_inplace_activation_after_layer():
    model, x = make("mlp")
    model[1] = torch.nn.ReLU(inplace=True)
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x), PMatDense, progress=False)
    torch.testing.assert_close(F.to_torch(), truth)


def test_sub_collection_from_modules_and_names():
    model, x = make("mlp")
    lc = LayerCollection.from_modules(model, [model[2]])
    truth = gt.fim(model, x, "classif_logits", names=["2.weight", "2.bias"])
    F = FIM(model, loader_of(x), PMatDense, layer_collection=lc, progress=False)
    torch.testing.assert_close(F.to_torch(), truth)
    lc2 = LayerCollection.from_parameter_names(model, ["0.bias", "2.weight"])
    truth = gt.fim(model, x, "classif_logits", names=["0.bias", "2.weight"])
    F = FIM(model, loader_of(x), PMatDiag, layer_collection=lc2, progress=False)
    torch.testing.assert_close(F.get_diag(), truth.diagonal())
