"""Diagonal of an operator known through products: stochastic (Bekas et al.) and exact."""

from __future__ import annotations

import torch

from ._common import (
    Estimate,
    check_positive_int,
    refuse_low_precision,
    sample_probes,
    sample_stderr,
)
from ._matvec import as_square_matmat

__all__ = ["diag_estimate", "exact_diag"]


def diag_estimate(
    A: object,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Estimate:
    """Stochastic diagonal estimate of Bekas, Kokiopoulou & Saad (2007).

        d̂ = (Σ_i z_i ⊙ A z_i) ⊘ (Σ_i z_i ⊙ z_i)

    With Rademacher probes the denominator is m, d̂ is unbiased and entry j has variance
    Σ_{l≠j} A_jl² / m. With Gaussian probes it is a ratio estimator (consistent, slightly
    biased). Costs m products.

    Args:
        A: square operator (n, n) (a plain callable needs :func:`as_matmat` with shape=).
        num_probes: m ≥ 1.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: source of the probes.
        batch_size: apply A to at most this many probes at once, default all at once.

    Returns:
        ``Estimate(value, stderr)`` with (n,) tensors. stderr is the delta-method standard error
        of the ratio, std_i(y_i − d̂ x_i)/(√m · mean_i x_i) with y_i = z_i ⊙ Az_i,
        x_i = z_i ⊙ z_i; for Rademacher probes this is the plain std(y_i)/√m. nan for m = 1.
    """
    check_positive_int(num_probes, "num_probes")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    op = as_square_matmat(A, what="diag_estimate")
    refuse_low_precision(op.dtype, "diag_estimate")
    n = op.shape[0]
    Z = sample_probes(
        n,
        num_probes,
        distribution=distribution,
        dtype=op.dtype,
        device=op.device,
        rng=generator,
    )
    step = num_probes if batch_size is None else batch_size
    Y = torch.cat(
        [Z[:, i : i + step] * op.matmat(Z[:, i : i + step]) for i in range(0, num_probes, step)],
        dim=1,
    )
    X = Z * Z
    xbar = X.mean(1)
    d = Y.mean(1) / xbar
    stderr = sample_stderr((Y - d[:, None] * X).T) / xbar
    return Estimate(d, stderr)


def exact_diag(A: object, *, chunk_size: int = 64) -> torch.Tensor:
    """Exact diagonal diag(A)_j = e_jᵀ A e_j from n products with unit vectors.

    The unit vectors are applied ``chunk_size`` at a time, so memory stays at n·chunk_size and
    the cost is ⌈n/chunk_size⌉ calls of ``A`` on (n, chunk_size) blocks. For a dense tensor the
    diagonal is read off directly.

    Returns:
        (n,) tensor, the dtype and device of A.
    """
    check_positive_int(chunk_size, "chunk_size")
    op = as_square_matmat(A, what="exact_diag")
    if isinstance(A, torch.Tensor):
        return torch.diagonal(A).clone()
    n = op.shape[0]
    out = torch.empty(n, dtype=op.dtype, device=op.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        E = torch.zeros(n, stop - start, dtype=op.dtype, device=op.device)
        cols = torch.arange(stop - start, device=op.device)
        E[start + cols, cols] = 1
        out[start:stop] = op.matmat(E)[start + cols, cols]
    return out
