"""The generic operator suite lives in :mod:`nngeo_ops.testing` (importable by users); the tests of
this folder import it from here."""

import torch

from nngeo_ops.testing import TOL, OperatorSuite, close  # noqa: F401


def rnd(gen, *shape):
    """A float64 Gaussian tensor of ``shape`` drawn from ``gen``."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def spd(B, shift=1.0):
    """B Bᵀ / n + shift·I: symmetric positive definite, smallest eigenvalue ≥ ``shift``."""
    n = B.shape[0]
    return B @ B.mT / n + shift * torch.eye(n, dtype=B.dtype)
