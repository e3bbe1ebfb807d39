"""PMatDense and PMatBlockDiag refuse, before reading any data, matrices that cannot fit in the
memory available (MemoryLimitError naming the size, the largest layer and what fits instead)."""

import pytest
import torch
from models import loader_of, make

from nngeo_ops.errors import MemoryLimitError
from nngeo_ops.nn import (
    FIM,
    CurvatureGenerator,
    Hessian,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    build_many,
)
from nngeo_ops.nn.losses import output_model_for_variant
from nngeo_ops.nn.pspace import base


@pytest.fixture
def setup(monkeypatch):
    model, x = make("mlp")  # Linear(4, 5) (25 parameters), Linear(5, 3) (18), float64
    passes = []
    real = CurvatureGenerator.run
    monkeypatch.setattr(
        CurvatureGenerator, "run", lambda *a, **k: passes.append(1) or real(*a, **k)
    )
    return model, loader_of(x), loader_of(x, torch.arange(6) % 3), passes


def limit(monkeypatch, nbytes):
    monkeypatch.setattr(base, "available_memory", lambda device=None: nbytes)


@pytest.mark.parametrize(
    "rep, need, largest",
    [(PMatDense, 43 * 43 * 8, "43 parameters"), (PMatBlockDiag, (25 * 25 + 18 * 18) * 8, "'0'")],
)
def test_too_large_dense_matrices_are_refused_before_the_pass(
    setup, monkeypatch, rep, need, largest
):
    model, loader, labelled, passes = setup
    limit(monkeypatch, need - 1)
    with pytest.raises(
        MemoryLimitError, match=rf"{rep.__name__} \(.*{largest}.*\) would take .*PMatKFAC"
    ):
        FIM(model, loader, rep, variant="classif_logits", progress=False)
    assert not passes  # refused before the pass over the data
    with pytest.raises(MemoryLimitError, match=rep.__name__):
        gen = CurvatureGenerator(model, output_model_for_variant("classif_logits"))
        build_many(gen, loader, [PMatDiag, rep])
    with pytest.raises(MemoryLimitError, match=rep.__name__):
        Hessian(model, labelled, torch.nn.CrossEntropyLoss(), rep)
    assert not passes  # refused before the pass over the data
    # exactly enough, or an unknown amount (no /proc/meminfo), builds as before
    for free in (need, None):
        limit(monkeypatch, free)
        F = FIM(model, loader, rep, variant="classif_logits", progress=False)
        assert F.to_torch().shape == (43, 43)
