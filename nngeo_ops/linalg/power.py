"""Power iteration for the dominant eigenpair of a symmetric operator."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from nngeo_ops.errors import ConvergenceWarning, InvalidArgumentError, ShapeError

from ._common import check_finite, check_positive_int, resolve_settings, sample_probes
from ._matvec import as_square_matmat, check_symmetric_if_dense

__all__ = ["PowerSettings", "power_iteration"]


@dataclass(frozen=True)
class PowerSettings:
    """Settings of :func:`power_iteration`.

    Attributes:
        num_iter: maximum number of products.
        tol: stop once ``‖A v − λ v‖ ≤ tol·|λ|`` (relative eigen-residual).
    """

    num_iter: int = 500
    tol: float = 1e-6

    def __post_init__(self) -> None:
        check_positive_int(self.num_iter, "num_iter")
        if not self.tol >= 0:
            raise InvalidArgumentError(f"tol must be >= 0, got {self.tol}")


def power_iteration(
    A: object,
    *,
    num_iter: int | None = None,
    tol: float | None = None,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    settings: PowerSettings | None = None,
    **overrides: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest-magnitude eigenpair of a symmetric operator by power iteration.

    Iterates v ← A v / ‖A v‖ with the Rayleigh quotient λ = vᵀ A v as eigenvalue estimate, until
    ``‖A v − λ v‖ ≤ tol·|λ|``. Converges at rate ``|λ₂/λ₁|`` per step; when the two largest magnitudes are
    equal (e.g. λ and −λ) it does not converge and warns.

    Args:
        A: symmetric operator (n, n); a plain callable takes its shape/dtype/device from ``v0``.
        num_iter, tol: override the fields of ``settings`` (a :class:`PowerSettings`), as do
            any other keyword ``overrides``.
        v0: start vector (n,); by default a Gaussian vector from ``generator``.
        generator: for the default start vector.

    Returns:
        ``(eigval, eigvec)``: a 0-d tensor λ (with its sign) and a unit (n,) vector v.

    Warns:
        ConvergenceWarning: the tolerance was not met within ``num_iter`` products.
    """
    s = resolve_settings(PowerSettings, settings, {"num_iter": num_iter, "tol": tol, **overrides})
    op = as_square_matmat(A, like=v0, what="power_iteration", symmetric=True)
    check_symmetric_if_dense(A, "power_iteration")
    n = op.shape[0]
    if v0 is None:
        v = sample_probes(
            n, 1, distribution="gaussian", dtype=op.dtype, device=op.device, rng=generator
        )
    else:
        if v0.ndim != 1 or v0.shape[0] != n:
            raise ShapeError(f"power_iteration: v0 must have shape ({n},), got {tuple(v0.shape)}")
        v = v0.reshape(n, 1).to(dtype=op.dtype, device=op.device)
    check_finite(v, "v0")
    norm = torch.linalg.vector_norm(v)
    if not bool(norm > 0):
        raise InvalidArgumentError(
            "power_iteration: the start vector v0 is zero; pass a nonzero v0"
        )
    v = v / norm
    Av = op.matmat(v)
    lam = (v * Av).sum()
    for _ in range(s.num_iter):
        resid = torch.linalg.vector_norm(Av - lam * v)
        check_finite(resid, "the power iteration (A produced NaN/inf)")
        if bool(resid <= s.tol * lam.abs()):
            return lam, v.reshape(n)
        nrm = torch.linalg.vector_norm(Av)
        if not bool(nrm > 0):
            # A v = 0 exactly: v is an eigenvector for 0, and no other direction can be reached.
            return lam, v.reshape(n)
        v = Av / nrm
        Av = op.matmat(v)
        lam = (v * Av).sum()
    rel = torch.linalg.vector_norm(Av - lam * v) / lam.abs().clamp_min(torch.finfo(op.dtype).tiny)
    warnings.warn(
        f"power_iteration did not converge in {s.num_iter} steps (relative residual "
        f"{float(rel):.3g} > "
        f"tol={s.tol}); raise num_iter, or the two largest |eigenvalues| may be (nearly) equal",
        ConvergenceWarning,
        stacklevel=2,
    )
    return lam, v.reshape(n)
