"""The exact Hessian in its four representations, against torch.func.hessian."""

import groundtruth as gt
import pytest
import torch
from models import loader_of, make
from torch import nn

from nngeo_ops.errors import UnsupportedError
from nngeo_ops.nn import Hessian, PMatBlockDiag, PMatDense, PMatDiag, PMatImplicit, PMatKFAC


@pytest.mark.parametrize("case", ["mlp", "conv2d", "generic"])
@pytest.mark.parametrize(
    "loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=["ce", "mse_sum"]
)
def test_hessian_representations(case, loss_fn):
    model, x = make(case)
    out = model(x)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    else:
        y = torch.randn(out.shape, dtype=torch.float64)
    truth = gt.exact_hessian(model, x, y, loss_fn)
    loader = loader_of(x, y, sizes=(2,))
    H = Hessian(model, loader, loss_fn, PMatDense, progress=False)
    torch.testing.assert_close(H.to_torch(), truth)
    assert not H.op.psd
    D = Hessian(model, loader, loss_fn, PMatDiag, progress=False)
    torch.testing.assert_close(D.get_diag(), truth.diagonal())
    B = Hessian(model, loader, loss_fn, PMatBlockDiag, progress=False)
    for sl in B.layer_collection.layer_slices().values():
        torch.testing.assert_close(B.to_torch()[sl, sl], truth[sl, sl])
    Im = Hessian(model, loader, loss_fn, PMatImplicit, progress=False)
    v = torch.randn(truth.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(Im.op @ v, truth @ v)


def test_hessian_rejects_structured_representations():
    model, x = make("mlp")
    with pytest.raises(UnsupportedError, match="PMatKFAC"):
        Hessian(model, loader_of(x), nn.CrossEntropyLoss(), PMatKFAC)
