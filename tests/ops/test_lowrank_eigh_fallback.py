"""LowRank.eigh_factors retries in float64 when the float32 eigensolver does not converge (as
Dense.eigh_factors does); seen on the stacked input rows of a KFAC moving average."""

import torch

from nngeo_ops.ops import LowRank


def test_lowrank_eigh_retries_in_float64(monkeypatch):
    torch.manual_seed(0)
    u = torch.randn(40, 6)
    real = torch.linalg.eigh
    calls = []

    def flaky(m, *a, **k):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    evals, q = LowRank(u, psd=True).eigh_factors()
    monkeypatch.setattr(torch.linalg, "eigh", real)
    assert calls == [torch.float32, torch.float64]
    assert evals.dtype == torch.float32 and q.shape == (40, 6)
    torch.testing.assert_close(q @ torch.diag(evals) @ q.T, u @ u.T, atol=1e-4, rtol=1e-4)
