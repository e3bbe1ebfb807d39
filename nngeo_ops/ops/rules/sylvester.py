"""``c·(A₁⊗…⊗A_d) + λI`` for factors that are not symmetric: Bartels–Stewart through Schur forms.

Symmetric factors (tagged, or detected by ``Dense`` as exactly ``M == Mᵀ``) take the eigen route
of :mod:`.sums`. For general square dense factors, the complex Schur forms ``A_i = U_i T_i U_iᴴ``
(``T_i`` upper triangular, ``U_i`` unitary) give ``⊗A_i = (⊗U_i)(⊗T_i)(⊗U_i)ᴴ`` with ``⊗T_i``
upper triangular, so

    (c·⊗A_i + λI)⁻¹ b = (⊗U_i) (c·⊗T_i + λI)⁻¹ (⊗U_i)ᴴ b,

and the triangular Kronecker system is solved by back substitution over the first factor's rows,
recursively (for two factors this is the Bartels–Stewart solve of the Sylvester equation
``c·A₁ X A₂ᵀ + λX = B``, as ``scipy.linalg.solve_sylvester``): ``O(Π nᵢ · Σ nᵢ)`` per column, never
a ``Π nᵢ``-sized matrix. The determinant is ``Π_{i,j,…} (c·αᵢγⱼ… + λ)`` over the factors'
eigenvalues (the Schur diagonals); complex eigenvalues come in conjugate pairs whose factors
multiply to a positive real, so the product, hence the sign, is real.

The Schur forms are computed by scipy on the CPU (cached on each factor). They carry no
gradient: with a factor that requires grad these rules step aside for the differentiable
fallbacks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import NonFiniteError, SingularError
from ..base import scalar_float
from ..cache import cached_factor
from ..composites import Scale, Sum
from ..dense import Dense
from ..diagonal import ScaledIdentity
from ..kronecker import Kronecker, kron_apply
from ..registry import rule


def _pattern(node: Sum):
    """``(c, factors, λ)`` for ``c·(A₁⊗…) + λ·I`` with dense, square, non-symmetric, constant
    factors; else None."""
    if len(node.terms) != 2:
        return None
    shifts = [t for t in node.terms if isinstance(t, ScaledIdentity)]
    rest = [t for t in node.terms if not isinstance(t, ScaledIdentity)]
    if len(shifts) != 1 or len(rest) != 1:
        return None
    t, c = rest[0], 1.0
    if isinstance(t, Scale):
        t, c = t.child, t.c
    if not (isinstance(t, Kronecker) and t.square_factors and not t.symmetric):
        return None
    if not all(isinstance(f, Dense) for f in t.factors) or node.needs_grad():
        return None
    return c, t.factors, shifts[0].c


def schur_factors(f: Dense) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, U)`` with ``M = U T Uᴴ`` (complex Schur form, ``T`` upper triangular), cached."""

    def compute():
        from scipy.linalg import schur

        M = f.M.detach()
        if not bool(torch.isfinite(M).all()):
            raise NonFiniteError(f"Schur form of {f.name}: the matrix contains NaN or inf entries")
        wide = np.complex128 if M.dtype in (torch.float64, torch.complex128) else np.complex64
        T, U = schur(M.cpu().numpy().astype(wide), output="complex")
        return torch.from_numpy(T).to(M.device), torch.from_numpy(U).to(M.device)

    return cached_factor(f, "schur", compute)


def _tri_kron_solve(Ts: list[torch.Tensor], t, lam, C: torch.Tensor) -> torch.Tensor:
    """``(t·(T₁⊗…⊗T_d) + λI)⁻¹ C`` for upper triangular ``Tᵢ``, by back substitution."""
    if len(Ts) == 1:
        M = t * Ts[0] + lam * torch.eye(Ts[0].shape[0], dtype=C.dtype, device=C.device)
        return torch.linalg.solve_triangular(M, C, upper=True)
    T1, rest = Ts[0], Ts[1:]
    m, k = T1.shape[0], C.shape[1]
    sizes = [T.shape[0] for T in rest]
    r = math.prod(sizes)
    Cb = C.reshape(m, r, k)
    Y = torch.empty_like(Cb)
    fns = [(lambda X, T=T: T @ X) for T in rest]
    for i in reversed(range(m)):
        rhs = Cb[i]
        if i < m - 1:  # the rows below are known: move t·T₁[i, j>i]·R·y_j to the right
            acc = torch.einsum("j,jrk->rk", T1[i, i + 1 :], Y[i + 1 :])
            rhs = rhs - t * kron_apply(fns, sizes, sizes, acc)
        Y[i] = _tri_kron_solve(rest, t * T1[i, i], lam, rhs)
    return Y.reshape(m * r, k)


def _shifted_eigenvalues(c, factors, lam) -> torch.Tensor:
    vals = None
    for f in factors:
        d = schur_factors(f)[0].diagonal()
        vals = d if vals is None else torch.kron(vals, d)
    return scalar_float(c) * vals + scalar_float(lam)


@rule("solve", Sum, name="Bartels–Stewart (Schur forms of the Kronecker factors)", priority=10)
def kronecker_shift_solve(node: Sum, ctx):
    pat = _pattern(node)
    if pat is None:
        return None
    c, factors, lam = pat
    z = _shifted_eigenvalues(c, factors, lam)
    if bool((z == 0).any()):
        raise SingularError(
            f"{node._str()} is singular (c·αᵢγⱼ + λ = 0 for some eigenvalues of the factors); "
            "change the shift λ"
        )
    Ts, Us = zip(*[schur_factors(f) for f in factors])
    sizes = [f.shape[0] for f in factors]
    cf, lf = scalar_float(c), scalar_float(lam)
    U_fns = [(lambda X, U=U: U @ X) for U in Us]
    Uh_fns = [(lambda X, U=U: U.mH @ X) for U in Us]

    def solve(B: torch.Tensor) -> torch.Tensor:
        Y = kron_apply(Uh_fns, sizes, sizes, B.to(Ts[0].dtype))
        Y = _tri_kron_solve(list(Ts), cf, lf, Y)
        return kron_apply(U_fns, sizes, sizes, Y).real.to(B.dtype)

    return solve


@rule("slogdet", Sum, name="Σ log|c·αᵢγⱼ + λ| from the factors' Schur eigenvalues", priority=10)
def kronecker_shift_slogdet(node: Sum, ctx):
    pat = _pattern(node)
    if pat is None:
        return None
    z = _shifted_eigenvalues(*pat)
    # the product is real (conjugate pairs): its sign is cos of the summed phases, which round-off
    # moves by O(n·eps) only (a real eigenvalue of the factors comes back with a tiny imaginary part)
    zero = bool((z == 0).any())
    phase = float(torch.angle(z.to(torch.complex128)).sum())
    sign = 0.0 if zero else (1.0 if math.cos(phase) > 0 else -1.0)
    logabs = torch.log(z.abs()).sum().to(node.dtype)
    return torch.tensor(sign, dtype=node.dtype, device=node.device), logabs
