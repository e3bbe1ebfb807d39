"""Closed-form ``(sign, log|det|)`` routines.

Kronecker: ``log|det(A₁⊗…⊗A_d)| = Σᵢ (N/nᵢ) log|det Aᵢ|`` with ``N = Π nᵢ``. Woodbury terms use the
matrix determinant lemma ``det(B + UCVᵀ) = det(B) · det(I + C Vᵀ B⁻¹ U)``.
"""

from __future__ import annotations

import math

import torch

from ..base import scalar_float
from ..blockdiag import BlockDiag
from ..composites import Product, Scale, Sum, Transpose
from ..dense import Dense
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..permutation import Permutation
from ..registry import rule
from ..shifted_dense import ShiftedDense
from ..symbolic import Inverse
from ._util import sign_tensor
from .solve import SHIFTED_DENSE_FACTOR
from .woodbury import wide_congruence_parts, woodbury_parts


def _from_values(v: torch.Tensor):
    sign = torch.where(v < 0, -1.0, 1.0).to(v.dtype).prod() * (v != 0).all().to(v.dtype)
    return sign, torch.log(v.abs()).sum()


def _lu_slogdet(LU: torch.Tensor, piv: torch.Tensor):
    d = LU.diagonal()
    swaps = int((piv != torch.arange(1, piv.numel() + 1, device=piv.device)).sum())
    sign, logabs = _from_values(d)
    return sign * (-1.0) ** swaps, logabs


@rule("slogdet", Dense, name="Cholesky (PSD) or LU")
def dense_slogdet(node: Dense, ctx):
    if node.psd:
        L = node.cholesky_factor()
        return sign_tensor(1.0, L), 2.0 * torch.log(L.diagonal()).sum().to(node.dtype)
    sign, logabs = _lu_slogdet(*node.lu_factors())
    return sign.to(node.dtype), logabs.to(node.dtype)


rule("slogdet", ShiftedDense, name=SHIFTED_DENSE_FACTOR)(dense_slogdet)


@rule("slogdet", Diagonal, name="sum of log|dᵢ|")
def diagonal_slogdet(node: Diagonal, ctx):
    return _from_values(node.d)


@rule("slogdet", ScaledIdentity, name="n·log|c|")
def identity_slogdet(node: ScaledIdentity, ctx):
    c = (
        node.c
        if isinstance(node.c, torch.Tensor)
        else torch.tensor(float(node.c), dtype=node.dtype, device=node.device)
    )
    s, la = _from_values(c.reshape(1))
    return s**node.n, node.n * la


@rule("slogdet", Eigen, name="sum of log|λᵢ|")
def eigen_slogdet(node: Eigen, ctx):
    if not node.full:
        z = torch.zeros((), dtype=node.dtype, device=node.device)
        return z, torch.full_like(z, -math.inf)
    return _from_values(node.evals)


@rule("slogdet", Kronecker, name="Σ (N/nᵢ)·logdet(Aᵢ)")
def kronecker_slogdet(node: Kronecker, ctx):
    if not node.square_factors:
        return None
    N = node.shape[0]
    sign, logabs = 1.0, 0.0
    for f in node.factors:
        s, la = ctx.slogdet_of(f)
        reps = N // f.shape[0]
        sign, logabs = sign * s**reps, logabs + reps * la
    return sign, logabs


def _sum_over(nodes, ctx):
    sign, logabs = 1.0, 0.0
    for f in nodes:
        s, la = ctx.slogdet_of(f)
        sign, logabs = sign * s, logabs + la
    return sign, logabs


@rule("slogdet", BlockDiag, name="sum over blocks")
def blockdiag_slogdet(node: BlockDiag, ctx):
    if node.row_sizes != node.col_sizes:
        return None
    return _sum_over(node.blocks, ctx)


@rule("slogdet", Product, name="sum over square factors")
def product_slogdet(node: Product, ctx):
    if not all(f.shape[0] == f.shape[1] for f in node.factors):
        return None
    return _sum_over(node.factors, ctx)


@rule("slogdet", Permutation, name="parity")
def permutation_slogdet(node: Permutation, ctx):
    z = torch.zeros((), dtype=node.dtype, device=node.device)
    return sign_tensor(float(node.sign()), z), z


@rule("slogdet", Scale, name="n·log|c| + logdet")
def scale_slogdet(node: Scale, ctx):
    s, la = ctx.slogdet_of(node.child)
    n = node.shape[0]
    c = node.c
    logc = torch.log(c.abs()) if isinstance(c, torch.Tensor) else math.log(abs(c))
    return s * (1.0 if scalar_float(c) > 0 else (-1.0) ** n), la + n * logc


@rule("slogdet", Transpose, name="same as the child")
def transpose_slogdet(node: Transpose, ctx):
    return ctx.slogdet_of(node.child)


@rule("slogdet", Inverse, name="negated logdet of the child")
def inverse_slogdet(node: Inverse, ctx):
    s, la = ctx.slogdet_of(node.child)
    return s, -la


@rule("slogdet", Sum, name="determinant lemma (structured + low rank)", priority=30)
def woodbury_slogdet(node: Sum, ctx):
    parts = woodbury_parts(node, ctx)
    if parts is None:
        return None
    LU, piv = parts.lu
    sb, lb = ctx.slogdet_of(parts.B, structured_only=True) or (None, None)
    if sb is None:
        return None
    ss, ls = _lu_slogdet(LU, piv)
    return sb * ss, lb + ls


@rule(
    "slogdet", Sum, name="determinant lemma in function space (Xᵀ·M·X + c·I, X wide)", priority=20
)
def wide_congruence_slogdet(node: Sum, ctx):
    """``det(c·I_n + XᵀMX) = cⁿ · det(c·I_m + K M) / cᵐ`` with ``K = X Xᵀ``."""
    parts = wide_congruence_parts(node, ctx)
    if parts is None:
        return None
    X, c, (LU, piv) = parts.X, parts.c, parts.lu
    m, n = X.shape
    ss, ls = _lu_slogdet(LU, piv)
    c_t = torch.as_tensor(c, dtype=X.dtype, device=X.device)
    sc = torch.sign(c_t.detach())
    lc = torch.log(c_t.abs())
    return (ss * sc ** (n - m)).to(X.dtype), (ls + (n - m) * lc).to(X.dtype)
