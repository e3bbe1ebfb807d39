"""Columns streamed through the accumulators: where the K output columns are back-propagated one at
a time (convolutions, embeddings: no batched backward), KFAC and the diagonal consume each layer's
cotangent of each column as the backward forms it (one update per layer and column, the context
naming that layer) instead of the (K, B, …) stack of every layer's cotangents. The factors must be those of
the stacked pass (forced here by a shared pass with PMatDense, whose accumulator is not column-wise),
which tests/nn/test_kfac.py checks against torch.func ground truth."""

import pytest
import torch
from models import loader_of, make

from nngeo_ops.nn import FIM, PMatDense, PMatDiag, PMatEye, PMatKFAC, build_many
from nngeo_ops.nn.engine import accumulators as _stats


class _Log(list):
    layers: list


@pytest.fixture
def seen(monkeypatch):
    """(column, k) of every context KFACAcc and DiagAcc were updated with; ``seen.layers`` the
    layer each context carried (None: all of them)."""
    log = _Log()
    log.layers = []
    for cls in (_stats.KFACAcc, _stats.DiagAcc):
        orig = cls.update

        def spy(self, ctx, _orig=orig):
            log.append((ctx.column, ctx.k))
            log.layers.append(ctx.layer)
            return _orig(self, ctx)

        monkeypatch.setattr(cls, "update", spy)
    return log


@pytest.mark.parametrize(
    "case,mode",
    [("conv2d", "expand"), ("conv2d", "reduce"), ("conv1d", "expand"), ("embedding", "expand")],
)
def test_streamed_kfac_equals_the_stacked_pass(case, mode, seen):
    model, x = make(case)
    loader = loader_of(x, sizes=(2, 2))
    streamed = FIM(model, loader, PMatKFAC, kfac_mode=mode, progress=False)
    n_batches = len(list(loader))
    layers = list(streamed.data)
    # 3 classes: C − 1 = 2 columns a batch (the loss Hessian has rank C − 1), each column once
    # for every layer, the columns in order
    assert [c for c, _ in seen] == [c for c in range(2) for _ in layers] * n_batches
    assert all(k == 1 for _, k in seen)
    n = len(layers)
    for i in range(0, len(seen), n):
        assert sorted(seen.layers[i : i + n]) == sorted(layers)
    seen.clear()
    gen = FIM(model, loader, PMatEye, kfac_mode=mode).generator
    stacked, dense = build_many(gen, loader, [PMatKFAC, PMatDense])
    assert seen and all(c is None and k == 2 for c, k in seen)
    torch.testing.assert_close(streamed.to_torch(), stacked.to_torch(), rtol=1e-12, atol=1e-14)
    # the factors themselves (A read once per batch, G summed over the streamed columns)
    for lid in streamed.data:
        for key in ("A", "G"):
            if key in streamed.data[lid]:
                torch.testing.assert_close(streamed.data[lid][key], stacked.data[lid][key])


@pytest.mark.parametrize("case", ["conv2d", "embedding"])
def test_streamed_diagonal_is_the_exact_diagonal(case, seen):
    model, x = make(case)
    loader = loader_of(x, sizes=(2, 3))
    diag = FIM(model, loader, PMatDiag, progress=False)
    assert seen and all(c is not None and k == 1 for c, k in seen)
    truth = FIM(model, loader, PMatDense, progress=False).get_diag()
    torch.testing.assert_close(diag.get_diag(), truth)


def test_batched_backward_is_not_streamed(seen):
    model, x = make("mlp")
    FIM(model, loader_of(x), PMatKFAC, progress=False)
    assert seen and all(c is None and k == 2 for c, k in seen)
