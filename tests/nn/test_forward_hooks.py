"""A forward hook of the user's on a covered module: one that leaves the output alone changes
nothing (results equal the torch.func truth); one that replaces or modifies the output in place is
refused with a clear error, where the layer's statistics would otherwise read the cotangent of the
hooked value as that of the module's own output (a silently wrong Fisher)."""

import groundtruth as gt
import pytest
import torch
from models import loader_of
from torch import nn

from nngeo_ops.errors import UnsupportedError
from nngeo_ops.nn import FIM, FIM_MonteCarlo, PMatBlockDiag, PMatDiag, PMatKFAC


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, torch.randn(7, 4, dtype=torch.float64)


@pytest.mark.parametrize("rep", [PMatDiag, PMatBlockDiag, PMatKFAC])
def test_a_hook_that_only_observes_changes_nothing(rep):
    model, x = model_and_data()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model[2].register_forward_hook(lambda m, i, o: o)  # returns the same tensor, unchanged
    F = FIM(model, loader_of(x), rep, variant="classif_logits", progress=False)
    assert seen
    if rep is not PMatKFAC:
        truth = gt.fim(model, x, "classif_logits")
        got = F.to_torch()
        mask = (got != 0) | (truth.abs() < 1e-300)
        torch.testing.assert_close(got[mask], truth[mask], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "hook",
    [lambda m, i, o: 2 * o, lambda m, i, o: [o.mul_(2), None][1], lambda m, i, o: o.tanh()],
    ids=["replaced", "in place", "another function"],
)
@pytest.mark.parametrize("rep", [PMatDiag, PMatKFAC])
def test_a_hook_that_changes_the_output_is_refused(hook, rep):
    model, x = model_and_data()
    model[2].register_forward_hook(hook)
    with pytest.raises(UnsupportedError, match=r"forward hook of module 2 \(Linear\).*output"):
        FIM(model, loader_of(x), rep, variant="classif_logits", progress=False)
    with pytest.raises(UnsupportedError, match="forward hook of module 2"):
        FIM_MonteCarlo(model, loader_of(x), rep, trials=2, progress=False)
