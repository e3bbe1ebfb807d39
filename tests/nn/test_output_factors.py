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


def _per_example_hessian(loss_of_one, out, y):
    """(B, E, E): the Hessian of ``loss_of_one(o, y_n)`` in the flattened output o, by torch.func."""
    from torch.func import hessian, vmap

    b = out.shape[0]

    def f(o, yy):
        return loss_of_one(o.reshape(out.shape[1:]), yy)

    return vmap(hessian(f))(out.reshape(b, -1), y)


def _output_models():
    # (output model, outputs, labels, the per-example output Hessian (B, E, E)): torch.func's
    # Hessian of the summed loss where the curvature is one, the Fisher's closed form otherwise
    from torch import nn

    from nngeo_ops.nn.losses import output_model_for_loss, output_model_for_variant

    torch.manual_seed(0)
    b = 5
    logits = torch.randn(b, 4, dtype=F64) * 2
    labels = torch.randint(0, 4, (b,))
    seg = torch.randn(b, 3, 2, 2, dtype=F64)
    seg_y = torch.randint(0, 3, (b, 2, 2))
    seq = torch.randn(b, 2, 4, dtype=F64)
    seq_y = torch.randint(0, 4, (b, 2))
    reg = torch.randn(b, 3, dtype=F64)
    cov = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=F64)
    logp = torch.log_softmax(logits, 1)
    ce = lambda o, y: nn.functional.cross_entropy(o[None], y[None], reduction="sum")  # noqa: E731
    bce = lambda o, y: nn.functional.binary_cross_entropy_with_logits(o, y, reduction="sum")  # noqa: E731
    masked = labels.clone()
    masked[1] = -100
    return [
        ("classif_logits", output_model_for_variant("classif_logits"), logits, labels,
         _per_example_hessian(ce, logits, labels)),
        ("classif_logsoftmax", output_model_for_variant("classif_logsoftmax"), logp, labels,
         torch.diag_embed(logp.exp())),
        ("classif_binary_logits", output_model_for_variant("classif_binary_logits"), reg,
         (reg > 0).to(F64), _per_example_hessian(bce, reg, (reg > 0).to(F64))),
        ("regression", output_model_for_variant("regression"), reg, reg * 0,
         torch.eye(3, dtype=F64).expand(b, 3, 3)),
        ("regression Σ", output_model_for_variant("regression", cov), reg, reg * 0,
         torch.linalg.inv(cov).expand(b, 3, 3)),
        ("segmentation_logits", output_model_for_variant("segmentation_logits"), seg, seg_y,
         _per_example_hessian(lambda o, y: ce(o, y), seg, seg_y)),
        ("sequence_logits", output_model_for_variant("sequence_logits"), seq, seq_y,
         _per_example_hessian(lambda o, y: ce(o.T, y), seq, seq_y)),
        ("CrossEntropyLoss, ignore_index", output_model_for_loss(nn.CrossEntropyLoss()), logits,
         masked, _per_example_hessian(
             lambda o, y: nn.functional.cross_entropy(o[None], y[None], reduction="sum"),
             logits, masked)),
        ("NLLLoss", output_model_for_loss(nn.NLLLoss()), logp, labels, torch.diag_embed(logp.exp())),
        ("MSELoss", output_model_for_loss(nn.MSELoss()), reg, reg * 0,
         2 * torch.eye(3, dtype=F64).expand(b, 3, 3)),
        ("BCEWithLogitsLoss", output_model_for_loss(nn.BCEWithLogitsLoss()), reg,
         (reg > 0).to(F64), _per_example_hessian(bce, reg, (reg > 0).to(F64))),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _output_models(), ids=lambda c: c[0])
def test_exact_apply_is_the_output_hessian_and_the_factor_product(case):
    # the closed form of L Lᵀ u (no factor formed) against the per-example output Hessian, and
    # against the factor's product; three columns u, with the count of the factor
    from nngeo_ops.nn.losses import apply_factor

    _, om, out, y, h = case
    u = torch.randn(3, *out.shape, dtype=F64)
    hu, count = om.exact_apply(out, y, u)
    b = out.shape[0]
    truth = torch.einsum("bij,kbj->kbi", h, u.reshape(3, b, -1)).reshape(u.shape)
    torch.testing.assert_close(hu, truth, rtol=1e-12, atol=1e-12)
    lmat, count_f = om.exact(out, y)
    assert count == count_f
    torch.testing.assert_close(hu, apply_factor(lmat, u), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("c", [1, 2, 10, 15, 16, 40])
def test_class_softmax_is_torch_softmax_and_contiguous(dtype, c):
    # the short-last-dim route (a softmax over dim 0 of the transpose) agrees with torch.softmax
    # to round-off, for extreme logits too, and hands back a contiguous tensor
    from nngeo_ops.nn.losses import class_softmax

    torch.manual_seed(c)
    for scale in (1.0, 50.0):
        logits = torch.randn(33, c, dtype=dtype) * scale
        p = class_softmax(logits)
        assert p.is_contiguous() and p.shape == logits.shape and p.dtype == dtype
        torch.testing.assert_close(p, torch.softmax(logits.to(F64), 1).to(dtype))
        torch.testing.assert_close(class_softmax(logits, -1), p, rtol=0, atol=0)
    # a non-contiguous input and a 3-D one take torch's own kernel
    x = torch.randn(c, 7, dtype=dtype).T
    torch.testing.assert_close(class_softmax(x), torch.softmax(x, 1), rtol=0, atol=0)
    y = torch.randn(5, c, 3, dtype=dtype)
    torch.testing.assert_close(class_softmax(y), torch.softmax(y, 1), rtol=0, atol=0)
