"""Bad input to the nn layer: each row asserts the exception type and that the message names the fix.

The library never returns a silent wrong answer nor fails deep inside torch: a row per class of
mistake (issue 8, nn half), every row checking ``pytest.raises(Type, match=fix)``.
"""

import pytest
import torch
from models import loader_of, make
from torch import nn

from nngeo_ops.errors import NonFiniteError
from nngeo_ops.nn import (
    FIM,
    Hessian,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
)


class SqrtAbs(nn.Module):
    """sqrt(|x|): finite at 0, with an infinite derivative there."""

    def forward(self, x):
        return x.abs().sqrt()


def sqrt_model():
    """Outputs finite, derivatives of layer '0' not: one hidden unit is exactly 0 on every input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), SqrtAbs(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = 0.0
    x = torch.randn(6, 4, dtype=torch.float64)
    assert torch.isfinite(model(x)).all()
    return model, loader_of(x)


NONFINITE_FIX = r"layers \['0'.*add a small epsilon"


def _implicit_mv():
    model, loader = sqrt_model()
    F = FIM(model, loader, PMatImplicit, progress=False)
    F.mv(torch.ones(F.size(0), dtype=torch.float64))


def _implicit_cached_mv():
    model, loader = sqrt_model()
    F = FIM(model, loader, lambda **kw: PMatImplicit(cache=True, **kw), progress=False)
    F.mv(torch.ones(F.size(0), dtype=torch.float64))


def _hessian(rep):
    def call():
        model, loader = sqrt_model()
        loader = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for (x,) in loader]
        H = Hessian(model, loader, nn.CrossEntropyLoss(), rep, progress=False)
        H.mv(torch.ones(H.size(0), dtype=torch.float64))

    return call


def _built(rep):
    return lambda: FIM(sqrt_model()[0], sqrt_model()[1], rep, progress=False)


ROWS = [
    # non-finite statistics while the outputs are finite: caught where they are produced
    ("nonfinite-diag", _built(PMatDiag), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-kfac", _built(PMatKFAC), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-ekfac", _built(PMatEKFAC), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-dense", _built(PMatDense), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-blockdiag", _built(PMatBlockDiag), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-lowrank", _built(PMatLowRank), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-implicit", _implicit_mv, NonFiniteError, NONFINITE_FIX),
    ("nonfinite-implicit-cached", _implicit_cached_mv, NonFiniteError, NONFINITE_FIX),
    ("nonfinite-hessian-dense", _hessian(PMatDense), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-hessian-implicit", _hessian(PMatImplicit), NonFiniteError, NONFINITE_FIX),
]


@pytest.mark.parametrize("call, exc, fix", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(call, exc, fix):
    with pytest.raises(exc, match=fix):
        call()
