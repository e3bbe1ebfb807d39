"""The linear algebra of a Laplace posterior precision P = s·F + diag(δ), one class per route.

``F`` is a curvature representation (a mean over N examples), ``s = N / (σ²·T)`` its scale and
``δ`` the prior precision as a vector over the parameters (constant for a scalar prior, constant on
each layer for a per-layer prior). Every route answers the same queries, each a differentiable torch
function of ``s`` and ``δ`` where that makes sense:

* ``logdet(s, δ)``: log det P;
* ``inv_quad(X, s, δ)``: Xᵀ P⁻¹ X for X of shape (P, m) (the functional variance J P⁻¹ Jᵀ);
* ``solve(X, s, δ)``: P⁻¹ X;
* ``diag_inv(s, δ)``: diag(P⁻¹);
* ``inv_sqrt(Z, s, δ)``: P^{-1/2} Z, or another square root R with R Rᵀ = P⁻¹ (for samples).

Routes:

* :class:`SpectralPosterior`: F = Q·diag(λ)·Qᵀ from the representation's own eigen form (``F.op.eigh()``:
  Kronecker of factor bases for KFAC/EKFAC, one eigh per block, the exact nonzero spectrum of the
  low-rank and implicit Fisher), computed once. When δ commutes with Q (a scalar prior; a per-layer
  prior with a layer-block-diagonal Q; any diagonal prior with Q = I) P = Q·diag(sλ + δ)·Qᵀ, so a
  new prior or noise level is a new shift of the same eigenvalues (O(P) per value). A truncated Q
  (k < P columns) adds δ on the complement: P⁻¹ = Q·diag(1/(sλ+δ) − 1/δ)·Qᵀ + I/δ.
* :class:`CholeskyPosterior`: dense blocks of F (dense and block-diagonal representations) with a
  prior that does not commute with their eigenbases (a diagonal prior): one Cholesky per block.
* :class:`IterativePosterior`: the implicit Fisher with too many outputs × examples for the exact
  function-space route, scalar prior. The log-determinant comes from one stochastic Lanczos
  quadrature of F (Krylov spaces are shift invariant, so the same Ritz values serve every s and δ:
  log det P ≈ Σ τ log(s·θ + δ)), with its standard error; solves run CG, with the bound
  ‖x − x*‖ ≤ ‖r‖/δ (P ⪰ δI) reported as the error.
"""

from __future__ import annotations

import math

import torch

from ..errors import UnsupportedError
from ..linalg import Estimate, cg, cholesky_solve, diag_estimate, slq
from ..ops import BlockDiag, Eigen, Identity, LinearOperator, MatFree


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


class SpectralPosterior:
    """P = Q·diag(s·λ + δ)·Qᵀ (+ δ·(I − QQᵀ) when Q is truncated); see the module docstring.

    Args:
        eig: the eigen form of F (an ops ``Eigen`` node, full or truncated).
        blocks: the parameter slices on which Q is block diagonal (a prior constant on each of
            them commutes with Q), or None when Q is unstructured.
        identity_q: Q is the identity (a diagonal F): any diagonal prior commutes.
    """

    route = "spectral"

    def __init__(self, eig: Eigen, blocks=None, identity_q: bool = False):
        self.eig = eig
        self.Q = eig.Q
        self.lam = eig.evals.detach().clamp_min(0)
        self.n = eig.shape[0]
        self.full = eig.full
        self.blocks = blocks
        self.identity_q = identity_q

    # ------------------------------------------------------------------ applicability
    def supports(self, kind: str) -> bool:
        """Whether a prior of ``kind`` ("scalar", "layerwise", "diag") commutes with Q."""
        if kind == "scalar":
            return True
        if not self.full:
            return False
        if kind == "layerwise":
            return self.identity_q or self.blocks is not None
        return self.identity_q

    def _shift(self, s, delta):
        """(s·λ + δ_e, δ0): the eigenvalues of P on Q's columns, and the complement's δ."""
        if self.full:
            return s * self.lam + delta, None
        d0 = delta[0]
        return s * self.lam + d0, d0

    # ------------------------------------------------------------------ queries
    def logdet(self, s, delta) -> torch.Tensor:
        ev, d0 = self._shift(s, delta)
        out = torch.log(ev).sum()
        if d0 is not None:
            out = out + (self.n - self.lam.shape[0]) * torch.log(d0)
        return out

    def _weights(self, s, delta, power: float):
        ev, d0 = self._shift(s, delta)
        w = ev**power
        if d0 is not None:
            return w - d0**power, d0**power
        return w, None

    def apply(self, X, s, delta, power: float) -> torch.Tensor:
        """P^power X (X of shape (P, m))."""
        w, c = self._weights(s, delta, power)
        out = self.Q @ (w.unsqueeze(1) * (self.Q.T @ X))
        return out if c is None else out + c * X

    def solve(self, X, s, delta) -> torch.Tensor:
        return self.apply(X, s, delta, -1.0)

    def inv_quad(self, X, s, delta) -> torch.Tensor:
        """Xᵀ P⁻¹ X from one product Qᵀ X."""
        w, c = self._weights(s, delta, -1.0)
        V = self.Q.T @ X
        out = V.mT @ (w.unsqueeze(1) * V)
        return out if c is None else out + c * (X.mT @ X)

    def diag_inv(self, s, delta) -> torch.Tensor:
        """diag(Q·diag(w)·Qᵀ) through the ops diagonal rule of the eigen form (structured for
        Kronecker / block-diagonal bases)."""
        w, c = self._weights(s, delta, -1.0)
        d = Eigen(self.Q, w.detach()).diag()
        return d if c is None else d + c.detach()

    def inv_sqrt(self, Z, s, delta) -> torch.Tensor:
        return self.apply(Z, s, delta, -0.5)

    def node(self, s, delta) -> LinearOperator:
        """P as an ops node (for ``explain``)."""
        ev, d0 = self._shift(s, delta)
        e = Eigen(self.Q, ev.detach())
        if d0 is None:
            return e
        e = Eigen(self.Q, (ev - d0).detach())
        return e + float(d0) * Identity(self.n, dtype=ev.dtype, device=ev.device)


class CholeskyPosterior:
    """P = blockdiag_b(s·F_b + diag(δ_b)) factorised by one Cholesky per block (differentiable)."""

    route = "cholesky"

    def __init__(self, blocks: list[tuple[slice, torch.Tensor]]):
        self.blocks = blocks
        self._memo = None

    def supports(self, kind: str) -> bool:
        return True

    def _factors(self, s, delta):
        key = (s, delta)
        if self._memo is not None and self._memo[0] is key[0] and self._memo[1] is key[1]:
            return self._memo[2]
        out = []
        for sl, fb in self.blocks:
            m = s * fb + torch.diag(delta[sl])
            out.append((sl, torch.linalg.cholesky(m)))
        self._memo = (s, delta, out)
        return out

    def logdet(self, s, delta):
        return sum(2 * torch.log(L.diagonal()).sum() for _, L in self._factors(s, delta))

    def solve(self, X, s, delta):
        return torch.cat([cholesky_solve(X[sl], L) for sl, L in self._factors(s, delta)])

    def inv_quad(self, X, s, delta):
        out = 0
        for sl, L in self._factors(s, delta):
            W = torch.linalg.solve_triangular(L, X[sl], upper=False)
            out = out + W.mT @ W
        return out

    def diag_inv(self, s, delta):
        return torch.cat(
            [torch.cholesky_inverse(L).diagonal() for _, L in self._factors(s, delta)]
        ).detach()

    def inv_sqrt(self, Z, s, delta):
        """L⁻ᵀ Z per block: (L⁻ᵀ)(L⁻ᵀ)ᵀ = (L Lᵀ)⁻¹ = P⁻¹."""
        return torch.cat(
            [
                torch.linalg.solve_triangular(L.mT, Z[sl], upper=True)
                for sl, L in self._factors(s, delta)
            ]
        )

    def node(self, s, delta) -> LinearOperator:
        from ..ops import Dense

        return BlockDiag(
            [Dense((s * fb + torch.diag(delta[sl])).detach(), psd=True) for sl, fb in self.blocks]
        )


class IterativePosterior:
    """The implicit Fisher P = s·F + δ·I by SLQ (log-determinant) and CG (solves), with errors.

    Args:
        op: F, an ops node of shape (P, P) known by its products.
        settings: the :class:`~nngeo_ops.apps.laplace.LaplaceSettings` (probes, steps, tolerances,
            seed).
    """

    route = "iterative"

    def __init__(self, op: LinearOperator, settings):
        self.op, self.settings = op, settings
        self.n = op.shape[0]
        self._quadrature = None
        self.last_error: dict[str, torch.Tensor] = {}

    def supports(self, kind: str) -> bool:
        return kind == "scalar"

    def _gen(self):
        return torch.Generator(device=self.op.device).manual_seed(self.settings.seed)

    def quadrature(self):
        """The SLQ rule of F (once; reused for every s and δ)."""
        if self._quadrature is None:
            st = self.settings
            self._quadrature = slq(
                self.op, num_probes=st.slq_probes, num_iter=st.slq_steps, generator=self._gen()
            )
        return self._quadrature

    def logdet_estimate(self, s, delta) -> Estimate:
        q = self.quadrature()
        d0 = delta[0]
        smp = q.samples(lambda t: torch.log(s * t.clamp_min(0) + d0))
        err = smp.detach().std() / math.sqrt(smp.shape[0]) if smp.shape[0] > 1 else smp * 0
        return Estimate(smp.mean(), err)

    def logdet(self, s, delta):
        est = self.logdet_estimate(s, delta)
        self.last_error["logdet"] = est.stderr
        return est.value

    def _system(self, s, delta) -> LinearOperator:
        return float(s) * self.op + float(delta[0]) * Identity(self.n, dtype=self.op.dtype)

    def solve_with_bound(self, X, s, delta):
        """(P⁻¹ X, ‖x_j − x_j*‖ bounds): CG, then ‖r_j‖/δ since P ⪰ δ·I."""
        st = self.settings
        Xs, info = cg(self._system(s, delta), X.detach(), tol=st.cg_tol, maxiter=st.cg_maxiter)
        bound = info.residual_norms / float(delta[0])
        return Xs, bound

    def solve(self, X, s, delta):
        Xs, bound = self.solve_with_bound(X, s, delta)
        self.last_error["solve"] = bound.max()
        return Xs

    def inv_quad(self, X, s, delta):
        """Xᵀ P⁻¹ X with the entrywise bound |error_ij| ≤ ‖x_i‖·‖r_j‖/δ."""
        Xs, bound = self.solve_with_bound(X, s, delta)
        err = X.norm(dim=0)[:, None] * bound[None, :]
        self.last_error["inv_quad"] = err
        return X.mT @ Xs

    def diag_inv(self, s, delta):
        st = self.settings
        system = self._system(s, delta)
        inv = MatFree(
            lambda V: cg(system, V, tol=st.cg_tol, maxiter=st.cg_maxiter)[0],
            (self.n, self.n),
            dtype=self.op.dtype,
            device=self.op.device,
            symmetric=True,
            psd=True,
            batched=True,
            name="P⁻¹",
        )
        est = diag_estimate(inv, st.diag_matvecs, generator=self._gen())
        self.last_error["diag_inv"] = est.stderr
        return est.value

    def inv_sqrt(self, Z, s, delta):
        raise UnsupportedError(
            "sampling needs P^{-1/2}, which the implicit Fisher has exactly only when outputs × "
            "examples ≤ settings.dense_limit; raise dense_limit, fit on fewer examples, or use "
            "representation=PMatKFAC / PMatDiag"
        )

    def node(self, s, delta) -> LinearOperator:
        return self._system(s, delta)
