"""``Kronecker(A, B, ...)``: the Kronecker product, applied factor by factor."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .base import LinearOperator, as_operator, harmonise
from .dense import Dense
from .leaf_checks import records_grad
from .lowrank import LowRank


def _sandwich(f0: Callable, f1: Callable, n0: int, n1: int, X: torch.Tensor) -> torch.Tensor:
    """``(A ⊗ B) x = vec(A X Bᵀ)`` for one column ``x = vec(X)``, ``X`` of shape ``(n0, n1)``, with
    ``f0``, ``f1`` applying ``A``, ``B`` to columns: ``W = B Xᵀ`` then ``A Wᵀ``, transposed views
    that the matrix products read in place, where :func:`kron_apply` moves the axis of each factor
    to the front with a copy (two copies of the vector per product, ~10 % of a KFAC mv)."""
    W = f1(X.view(n0, n1).mT)  # (m1, n0)
    return f0(W.mT).reshape(-1, 1)  # (m0, m1), row-major when f0 returns a fresh product


def _triple(
    L: torch.Tensor, X: torch.Tensor, R: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``L X R`` associated the cheaper way: ``(L X) R`` costs l·x·r' + l·r·r', ``L (X R)``
    x·r·r' + l·x·r' (L: l × x, X: x × r, R: r × r'). They differ when a factor is rectangular,
    as a thin eigenbasis (dA × k, k < dA) is: Q_Gᵀ X Q₁ read left to right costs dG·dG·dA + dG·dA·k,
    right to left dG·dA·k + dG·dG·k. ``out``: where the last product goes (shape (l, r'))."""
    l, x = L.shape
    r, r2 = R.shape
    if x * r * r2 + l * x * r2 < l * x * r + l * r * r2:
        return torch.matmul(L, X @ R, out=out)
    return torch.matmul(L @ X, R, out=out)


def _low_rank_sandwich(
    G: torch.Tensor, lr: Any, X: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``(G ⊗ A) x = vec(G X Aᵀ)`` for a low-rank ``A = U C Vᵀ`` (rank k), as ``G ((X V) Cᵀ) Uᵀ``:
    G then acts on k columns instead of A's m₁. For a KFAC block whose input factor comes from
    fewer rows than its size (a batch of 256 for a 785-wide layer) that is 119 M multiply-adds
    instead of 153 M. None when the plain order (A first, then G) is not more expensive.
    ``out``: where the last product goes, as an ``(m0, m1)`` matrix (then returned as it is)."""
    if not _thin_first(G, lr):
        return None
    m0, n0 = G.shape
    Y = X.view(n0, lr.shape[1]) @ lr.Vm  # (n0, k)
    if lr.C is not None:
        Y = Y @ lr.C.mT
    if out is not None:
        return torch.matmul(G @ Y, lr.U.mT, out=out)
    return ((G @ Y) @ lr.U.mT).reshape(-1, 1)  # (m0, m1), row-major


def _thin_first(G: torch.Tensor, lr: Any) -> bool:
    """Whether ``(G ⊗ U C Vᵀ) x`` costs less with G applied to the k columns of ``X V`` (then
    ``Uᵀ``) than to the m₁ columns of ``X Aᵀ`` (see :func:`_low_rank_sandwich`)."""
    m0, n0 = G.shape
    m1, n1 = lr.shape
    k = lr.rank
    core = 0 if lr.C is None else n0 * k * k
    thin = n0 * n1 * k + core + m0 * n0 * k + m0 * k * m1
    plain = n0 * n1 * k + core + n0 * k * m1 + m0 * n0 * m1
    return thin < plain


def _bordered_times(W: torch.Tensor, c: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``[W | c] R`` without forming ``[W | c]``: ``W R[:cols] + c R[cols]`` (a product and a
    rank-one update in place)."""
    T = W @ R[: W.shape[1]]
    T.addr_(c, R[W.shape[1]])
    return T


def _split_times(Z: torch.Tensor, R: torch.Tensor, oW: torch.Tensor, oc: torch.Tensor) -> None:
    """``[oW | oc] ← Z Rᵀ``: the columns ``:cols`` and ``cols`` of the product, each written
    straight into its place."""
    cols = oW.shape[1]
    torch.matmul(Z, R[:cols].mT, out=oW)
    torch.mv(Z, R[cols], out=oc)


def _times_split(G: torch.Tensor, T: torch.Tensor, oW: torch.Tensor, oc: torch.Tensor) -> None:
    """``[oW | oc] ← G T``: the columns ``:cols`` and ``cols`` of the product, each written
    straight into its place."""
    cols = oW.shape[1]
    torch.matmul(G, T[:, :cols], out=oW)
    torch.mv(G, T[:, cols], out=oc)


def bordered_kron_into(
    G: torch.Tensor,
    A: Any,
    rows: int,
    cols: int,
    x: torch.Tensor,
    out: torch.Tensor,
    evals: torch.Tensor | None = None,
) -> None:
    """``out ← Pᵀ (G ⊗ A) P x`` for one vector, with ``P`` the
    :class:`~nngeo_ops.ops.AppendColumn` permutation ``[vec(W); c] ↦ vec([W | c])`` (W of shape
    ``rows × cols``): the KFAC block of a layer with a bias, in parameter order. With ``evals``,
    ``out ← Pᵀ Q diag(evals) Qᵀ P x`` for the eigenbasis ``Q = G ⊗ A`` instead (EKFAC).

    ``G`` is a ``rows × rows`` tensor (``rows × k_G`` for a basis), ``A`` a ``(cols + 1)``-square
    tensor (``(cols + 1) × k_A`` for a basis, possibly thin) or a :class:`LowRank` node; ``x``
    and ``out`` are contiguous vectors of length ``rows·(cols + 1)``.

    With ``X = [W | c]``, ``(G ⊗ A) vec(X) = vec(G X Aᵀ)``, and ``X R = W R[:cols] + c R[cols]``
    for any ``R`` with ``cols + 1`` rows (a product and a rank-one update), so ``X`` itself is
    never formed; the result's columns ``:cols`` (the weights) and ``cols`` (the biases) are two
    products written straight into their places in ``out``. For a low-rank ``A = U C Vᵀ`` the
    same reads ``X V``, then ``G`` on its k columns (when cheaper, :func:`_thin_first`), then
    ``Uᵀ`` split by rows. The eigen form is ``S = Gᵀ (X A) ∘ Λ`` (``Λ`` the ``k_G × k_A`` view of
    ``evals``), then ``(G S) Aᵀ`` split. Against ``P``, the Kronecker product and ``Pᵀ`` applied in
    turn this saves the interleaved copy of ``x``, the block's result and its reordering: on the
    benchmark MLP's first layer (784 → 256, A of rank 256) three temporaries of 785 KB, leaving
    two of 256 KB.
    """
    w = rows * cols
    W, c = x[:w].view(rows, cols), x[w:]
    oW, oc = out[:w].view(rows, cols), out[w:]
    if evals is not None:
        S = G.mT @ _bordered_times(W, c, A)  # Qᵀ P x as a (k_G, k_A) matrix
        S.mul_(evals.reshape(S.shape))
        _split_times(G @ S, A, oW, oc)
        return
    if isinstance(A, torch.Tensor):
        _times_split(G, _bordered_times(W, c, A.mT), oW, oc)  # G (X Aᵀ)
        return
    Y = _bordered_times(W, c, A.Vm)  # X V, (rows, k)
    if A.C is not None:
        Y = Y @ A.C.mT
    if _thin_first(G, A):
        _split_times(G @ Y, A.U, oW, oc)
        return
    _times_split(G, Y @ A.U.mT, oW, oc)  # G (X Aᵀ)


def kron_apply(
    fns: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    in_sizes: Sequence[int],
    out_sizes: Sequence[int],
    X: torch.Tensor,
) -> torch.Tensor:
    """``(A₁ ⊗ … ⊗ A_d) X`` where ``fns[i]`` applies ``A_i`` (shape ``out_i × in_i``) to columns.

    The row index of ``X`` is read row-major as ``(i₁, …, i_d)`` (the ``torch.kron`` convention);
    each factor acts along its own axis, so the cost is ``Σ_i (Π_j n_j) · m_i`` per column instead of
    ``(Π m_i)(Π n_i)``.
    """
    k = X.shape[1]
    if len(fns) == 2 and k == 1:  # one vector (a KFAC block's G·V·Aᵀ): two products, no shuffles
        return _sandwich(fns[0], fns[1], in_sizes[0], in_sizes[1], X)
    T = X.reshape(*in_sizes, k)
    sizes = list(in_sizes)
    for i, f in enumerate(fns):
        T = T.movedim(i, 0)
        rest = T.shape[1:]
        T = f(T.reshape(sizes[i], -1)).reshape(out_sizes[i], *rest).movedim(0, i)
        sizes[i] = out_sizes[i]
    return T.reshape(math.prod(out_sizes), k)


class Kronecker(LinearOperator):
    """``A₁ ⊗ A₂ ⊗ …``; the dense twin is ``torch.kron(A₁, torch.kron(A₂, …))``.

    Factor order: for KFAC blocks of a layer with weight ``W`` of shape ``(out, in)`` flattened
    row-major, the block is ``G ⊗ A`` (output-gradient factor first, input factor second).
    Factors may be nodes or tensors (wrapped as :class:`Dense`) and may be rectangular.
    """

    _node_fields = ("factors",)

    def __init__(self, *factors: Any) -> None:
        if len(factors) == 1 and isinstance(factors[0], (list, tuple)):
            factors = tuple(factors[0])
        if not factors:
            raise InvalidArgumentError("Kronecker needs at least one factor")
        fs = harmonise(tuple(as_operator(f) for f in factors))
        shape = (math.prod(f.shape[0] for f in fs), math.prod(f.shape[1] for f in fs))
        super().__init__(
            shape,
            fs[0].dtype,
            fs[0].device,
            symmetric=all(f.symmetric for f in fs),
            psd=all(f.psd for f in fs),
            orthogonal=all(f.orthogonal for f in fs),
        )
        self.factors = fs

    def _rebuild(self, **fields: Any) -> Kronecker:
        return Kronecker(*fields.get("factors", self.factors))

    @property
    def square_factors(self) -> bool:
        """Whether every factor is square."""
        return all(f.shape[0] == f.shape[1] for f in self.factors)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        fs = self.factors
        if X.shape[1] == 1 and len(fs) == 2 and type(fs[0]) is Dense and type(fs[1]) is Dense:
            A, B = fs[0].M, fs[1].M  # two products, no copy at all
            return _triple(A, X.view(A.shape[1], B.shape[1]), B.mT).view(-1, 1)
        if X.shape[1] == 1 and len(fs) == 2 and type(fs[0]) is Dense and type(fs[1]) is LowRank:
            out = _low_rank_sandwich(fs[0].M, fs[1], X)
            if out is not None:
                return out
        return kron_apply(
            [f._matmat for f in fs], [f.shape[1] for f in fs], [f.shape[0] for f in fs], X
        )

    def _matmat_into(self, X: torch.Tensor, out: torch.Tensor) -> None:
        # one vector and two factors: the last of the two products goes to out, viewed as the
        # (m0, m1) matrix of the result (no temporary of the block's size)
        fs = self.factors
        if X.shape[1] == 1 and len(fs) == 2 and out.is_contiguous() and type(fs[0]) is Dense:
            A = fs[0].M
            if type(fs[1]) is Dense and not records_grad(X, out, A, fs[1].M):
                B = fs[1].M
                _triple(A, X.view(A.shape[1], B.shape[1]), B.mT, out=out.view(A.shape[0], -1))
                return
            lr = fs[1]
            if (
                type(lr) is LowRank
                and not records_grad(X, out, A, lr.U, lr.C, lr.V)
                and _low_rank_sandwich(A, lr, X, out=out.view(A.shape[0], -1)) is not None
            ):
                return
        out.copy_(self._matmat(X))

    def bordered_into(
        self,
        rows: int,
        cols: int,
        x: torch.Tensor,
        out: torch.Tensor,
        evals: torch.Tensor | None = None,
    ) -> bool:
        """``out ← Pᵀ (self) P x`` (with ``evals``: ``Pᵀ self·diag(evals)·selfᵀ P x``, this node
        an eigenbasis) by :func:`bordered_kron_into`, ``P`` the
        :class:`~nngeo_ops.ops.AppendColumn` ``(rows, cols)``; True when it ran.

        It runs when this is ``G ⊗ A`` of a Dense ``G`` with ``rows`` rows and a Dense (or, without
        ``evals``, LowRank) ``A`` with ``cols + 1`` rows (square without ``evals``), ``x`` and
        ``out`` are contiguous vectors and autograd records nothing; otherwise it returns False
        and leaves ``out`` untouched.
        """
        fs = self.factors
        if len(fs) != 2 or type(fs[0]) is not Dense or fs[0].shape[0] != rows:
            return False
        G, a = fs[0].M, fs[1]
        if a.shape[0] != cols + 1 or not (x.is_contiguous() and out.is_contiguous()):
            return False
        if evals is not None:
            if type(a) is not Dense or records_grad(x, out, G, a.M, evals):
                return False
            bordered_kron_into(G, a.M, rows, cols, x, out, evals)
            return True
        if fs[0].shape[1] != rows or a.shape[1] != cols + 1:
            return False
        if type(a) is Dense:
            if records_grad(x, out, G, a.M):
                return False
            bordered_kron_into(G, a.M, rows, cols, x, out)
            return True
        if type(a) is LowRank and not records_grad(x, out, G, a.U, a.C, a.V):
            bordered_kron_into(G, a, rows, cols, x, out)
            return True
        return False

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        fs = self.factors
        if X.shape[1] == 1 and len(fs) == 2 and type(fs[0]) is Dense and type(fs[1]) is Dense:
            A, B = fs[0].M, fs[1].M
            return _triple(A.mT, X.view(A.shape[0], B.shape[0]), B).view(-1, 1)
        return kron_apply(
            [f._rmatmat for f in fs], [f.shape[0] for f in fs], [f.shape[1] for f in fs], X
        )

    def to_dense(self) -> torch.Tensor:
        # torch.kron rejects some non-contiguous layouts (e.g. transposed eigenbases)
        out = self.factors[0].to_dense().contiguous()
        for f in self.factors[1:]:
            out = torch.kron(out, f.to_dense().contiguous())
        return out

    def _str(self) -> str:
        return "(" + "⊗".join(_wrap(f) for f in self.factors) + ")"


def _wrap(node: LinearOperator) -> str:
    s = node._str()
    return (
        s if s.replace("_", "").isalnum() or s.startswith(("(", "Eig[", "BlockDiag[")) else f"({s})"
    )
