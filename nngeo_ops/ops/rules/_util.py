"""Small helpers shared by rules."""

from __future__ import annotations

import torch

from ...errors import NonFiniteError, NotPSDError, SingularError
from ..base import LinearOperator, Scalar, scalar_float
from ..composites import Product, is_transpose_of


def orthogonal_congruence(node: LinearOperator) -> tuple | None:
    """``(Qᵀ, M, Q)`` when ``node`` is ``Product(Qᵀ, M, Q)`` with ``Q`` square orthogonal."""
    if isinstance(node, Product) and len(node.factors) == 3:
        a, m, q = node.factors
        if is_transpose_of(a, q) and q.orthogonal and q.shape[0] == q.shape[1]:
            return a, m, q
    return None


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float32 and half precisions (small systems that carry a damping's conditioning)."""
    return torch.float64 if dtype in (torch.float32, torch.float16, torch.bfloat16) else dtype


def congruence_gram(node: LinearOperator, ctx, from_products: bool = False) -> tuple | None:
    """For ``node = Xᵀ·M·X`` (M symmetric, X of shape (m, n), m ≤ ``policy.dense_limit``): ``(X, M,
    K)`` with M and ``K = X Xᵀ`` dense, in float64 for float32 operands; else None.

    K comes from ``X.gram()`` where the node offers it (the ``Jacobian`` of ``nngeo_ops.nn``, from
    its NTK engine); otherwise, with ``from_products``, from m products with Xᵀ and X. Memoised per
    compilation, so that trace, norm, spectrum, solve and log-determinant share one K.
    """
    return ctx.memo(
        ("congruence gram", from_products), node, lambda: _congruence_gram(node, ctx, from_products)
    )


def _congruence_gram(node: LinearOperator, ctx, from_products: bool) -> tuple | None:
    out = None
    if isinstance(node, Product) and len(node.factors) == 3:
        qt, M, X = node.factors
        m = X.shape[0]
        if is_transpose_of(qt, X) and M.symmetric and m <= ctx.policy.dense_limit:
            gram = getattr(X, "gram", None)
            K = gram() if callable(gram) else None
            if K is None and from_products:
                K = X._matmat(X._rmatmat(torch.eye(m, dtype=X.dtype, device=X.device)))
            if K is not None:
                wide = wide_dtype(X.dtype)
                Md, K = M.to_dense().to(wide), K.to(wide)
                if not (bool(torch.isfinite(Md).all()) and bool(torch.isfinite(K).all())):
                    raise NonFiniteError(f"{node._str()}: X Xᵀ or M has NaN or inf entries")
                out = (X, Md, K)
    return out


def check_nonzero(values: torch.Tensor | Scalar, what: str) -> None:
    zero = (
        bool((values == 0).any())
        if isinstance(values, torch.Tensor) and values.dim() > 0
        else scalar_float(values) == 0
    )
    if zero:
        raise SingularError(f"{what} is singular (a zero on its diagonal / spectrum); add damping")


def spectral_power(values: torch.Tensor, p: float, what: str) -> torch.Tensor:
    """``values ** p`` with the checks that make ``A^p`` well defined for a symmetric ``A``."""
    if not float(p).is_integer():
        # eigenvalues of a singular PSD matrix come out as tiny negatives; round-off is not an error
        tol = values.numel() * torch.finfo(values.dtype).eps * float(values.detach().abs().max())
        values = torch.where((values < 0) & (values >= -tol), torch.zeros_like(values), values)
    if not float(p).is_integer() and bool((values < 0).any()):
        raise NotPSDError(
            f"{what}^{p}: a non-integer power needs a PSD matrix, but the spectrum has negative "
            f"values (min {float(values.min()):.3g}); add damping or use an integer power"
        )
    if p < 0:
        check_nonzero(values, what)
    return values**p


def sign_tensor(s: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(s, dtype=like.dtype, device=like.device)
