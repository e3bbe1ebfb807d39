"""The exact output factors of the softmax losses: C − 1 stick-breaking columns per position whose
outer products sum to diag(p) − ppᵀ (checked here against that matrix, formed from torch.softmax)."""

import pytest
import torch

from nngeo_ops.nn.losses import softmax_factor

F64 = torch.float64


def _truth(logits):
    p = torch.softmax(logits.to(F64), 1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


@pytest.mark.parametrize("c", [2, 3, 10])
@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0, 1e3])
def test_softmax_factor_is_a_square_root_with_c_minus_1_columns(c, scale):
    # moderate to extreme logits (probabilities underflowing to 0 in float64 at 1e3): every entry
    # finite, Σ_k v_k v_kᵀ = diag(p) − ppᵀ to round-off of the largest entry, diagonal positive
    torch.manual_seed(c)
    logits = torch.randn(64, c, dtype=F64) * scale
    lf = softmax_factor(logits)
    assert lf.shape == (c - 1, 64, c)
    assert torch.isfinite(lf).all()
    h = torch.einsum("kbi,kbj->bij", lf, lf)
    torch.testing.assert_close(h, _truth(logits), rtol=0, atol=1e-15)
    assert (h.diagonal(dim1=1, dim2=2) >= 0).all()


def test_softmax_factor_in_float32_with_saturated_logits():
    logits = torch.tensor([[0.0, 80.0, -80.0, 0.0], [200.0, -200.0, 0.0, 1.0], [0.0] * 4])
    lf = softmax_factor(logits)
    assert torch.isfinite(lf).all() and lf.dtype == torch.float32
    h = torch.einsum("kbi,kbj->bij", lf.to(F64), lf.to(F64))
    torch.testing.assert_close(h, _truth(logits), rtol=0, atol=1e-7)


def test_softmax_factor_per_position_and_one_class():
    # segmentation: column (j, d) lives at position d only; C = 1: one zero column per position
    logits = torch.randn(3, 4, 2, 5, dtype=F64)
    lf = softmax_factor(logits)
    assert lf.shape == (3 * 10, 3, 4, 2, 5)
    flat = lf.reshape(lf.shape[0], 3, 4, 10)
    h = torch.einsum("kbid,kbje->bidje", flat, flat)
    truth = torch.zeros_like(h)
    for d in range(10):
        truth[:, :, d, :, d] = _truth(logits.reshape(3, 4, 10)[:, :, d])
    torch.testing.assert_close(h, truth, rtol=0, atol=1e-15)
    one = softmax_factor(torch.randn(5, 1, 3, dtype=F64))
    assert one.shape == (3, 5, 1, 3) and not one.any()
