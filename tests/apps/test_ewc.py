"""EWC over three tasks against the dense sum ½·λ·Σ_t (w − w_t)ᵀ F_t (w − w_t)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nngeo_ops.apps import EWC
from nngeo_ops.errors import InvalidArgumentError
from nngeo_ops.nn import FIM, PMatDense, PMatDiag, PMatEKFAC, PMatImplicit, PMatKFAC
from tests.nn import groundtruth as gt

DT = torch.float64


def _task(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(3, (n,), generator=g)
    return x, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _move(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))


def _flat(model):
    return torch.cat([p.reshape(-1) for p in model.parameters()])


def _grad(model, value):
    model.zero_grad()
    value.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(
    "rep", [PMatDense, PMatDiag, PMatKFAC, PMatEKFAC, PMatImplicit], ids=lambda r: r.__name__
)
def test_three_tasks_against_dense_sum(rep):
    model = _model()
    ewc = EWC(model, strength=7.0)
    anchors, fishers = [], []
    for t in range(3):
        x, loader = _task(t)
        F = ewc.add_task(loader, representation=rep)
        # the representation's own dense matrix; the exact kinds also against torch.func
        dense = F.to_torch()
        if rep in (PMatDense, PMatImplicit):
            torch.testing.assert_close(dense, gt.fim(model, x, "classif_logits"))
        anchors.append(_flat(model).detach().clone())
        fishers.append(dense)
        _move(model, 10 + t)
    assert ewc.n_tasks == 3
    w = _flat(model).detach()
    ref = 0.5 * 7.0 * sum((w - a) @ f @ (w - a) for a, f in zip(anchors, fishers))
    ref_grad = 7.0 * sum(f @ (w - a) for a, f in zip(anchors, fishers))
    pen = ewc.penalty()
    torch.testing.assert_close(pen.detach(), ref)
    torch.testing.assert_close(_grad(model, pen), ref_grad)


def test_online_ewc_against_dense():
    model = _model()
    ewc = EWC(model, strength=3.0, online=True, decay=0.5)
    run = None
    for t in range(3):
        _, loader = _task(t)
        F = ewc.add_task(loader, representation=PMatDiag)
        run = F.to_torch() if run is None else 0.5 * run + F.to_torch()
        anchor = _flat(model).detach().clone()
        _move(model, 20 + t)
    assert ewc.n_tasks == 1  # one running Fisher: one product per penalty
    w = _flat(model).detach()
    pen = ewc.penalty()
    torch.testing.assert_close(pen.detach(), 0.5 * 3.0 * (w - anchor) @ run @ (w - anchor))
    torch.testing.assert_close(_grad(model, pen), 3.0 * run @ (w - anchor))


def test_penalty_zero_at_anchor_and_bad_arguments():
    model = _model()
    ewc = EWC(model, strength=1.0)
    _, loader = _task(0)
    ewc.add_task(loader, representation=PMatKFAC)
    assert float(ewc.penalty().detach()) == 0.0
    with pytest.raises(InvalidArgumentError, match="strength"):
        EWC(model, strength=-1.0)
    with pytest.raises(InvalidArgumentError, match="decay"):
        EWC(model, online=True, decay=2.0)
    other = FIM(nn.Linear(4, 3).to(DT), loader, PMatDiag, progress=False)
    with pytest.raises(InvalidArgumentError, match="layer collection"):
        ewc.add_task(loader, fisher=other)
