"""The block-diagonal Fisher's Kronecker-form blocks (a Linear layer, one position per example) are
computed from their upper triangle and mirrored: bitwise symmetric, equal to the torch.func Fisher,
and above ``SYMV_MIN_SIZE`` their products read one triangle."""

import groundtruth as gt
import pytest
import torch
from models import loader_of
from torch import nn

from nngeo_ops.linalg.symv import SYMV_MIN_SIZE
from nngeo_ops.nn import FIM, FIM_MonteCarlo, PMatBlockDiag, PVector
from nngeo_ops.ops import dense as dense_module


@pytest.mark.parametrize("bias", [True, False])
def test_linear_blocks_are_bitwise_symmetric_and_exact(bias, monkeypatch):
    torch.manual_seed(0)
    # last layer 45·12 (+12) ≥ SYMV_MIN_SIZE parameters: the block is above the symv size
    model = nn.Sequential(nn.Linear(7, 45), nn.Tanh(), nn.Linear(45, 12, bias=bias)).double()
    x = torch.randn(20, 7, dtype=torch.float64)
    F = FIM(
        model, loader_of(x, sizes=(8,)), PMatBlockDiag, variant="classif_logits", progress=False
    )
    truth = gt.fim(model, x, "classif_logits")
    blocks = F.op.blocks
    sizes = [p.numel() for p in model.parameters()]
    n_last = sum(sizes[2:])
    assert blocks[-1].shape[0] == n_last >= SYMV_MIN_SIZE
    for b in blocks:
        assert torch.equal(b.M, b.M.mT)
    torch.testing.assert_close(blocks[-1].M, truth[-n_last:, -n_last:], rtol=1e-10, atol=1e-12)

    seen = []
    real = dense_module.symv
    monkeypatch.setattr(
        dense_module, "symv", lambda M, v, out=None: seen.append(1) or real(M, v, out)
    )
    v = torch.randn(truth.shape[0], dtype=torch.float64)
    mask = torch.block_diag(*[torch.ones(b.shape, dtype=torch.float64) for b in blocks])
    got = F.mv(PVector(F.layer_collection, vector_repr=v)).to_torch()
    torch.testing.assert_close(got, (truth * mask) @ v, rtol=1e-10, atol=1e-12)
    assert seen  # the large block's product went through symv


def test_monte_carlo_block_is_bitwise_symmetric():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 50), nn.ReLU(), nn.Linear(50, 11)).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    F = FIM_MonteCarlo(model, loader_of(x, sizes=(16,)), PMatBlockDiag, trials=3, progress=False)
    for b in F.op.blocks:
        assert torch.equal(b.M, b.M.mT)
