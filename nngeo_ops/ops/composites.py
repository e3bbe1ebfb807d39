"""Composition nodes: ``Sum``, ``Product``, ``Scale`` and ``Transpose``."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ShapeError
from .base import LinearOperator, Scalar, as_operator, fmt_scalar, harmonise, scalar_float


def paren(node: LinearOperator) -> str:
    s = node._str()
    return f"({s})" if isinstance(node, (Sum, Product, Scale)) else s


def is_transpose_of(a: LinearOperator, b: LinearOperator) -> bool:
    """Whether ``a`` is structurally ``bᵀ`` (the same object under a transpose, or inverse perms)."""
    from .permutation import Permutation

    if isinstance(a, Transpose) and a.child is b:
        return True
    if isinstance(b, Transpose) and b.child is a:
        return True
    if isinstance(a, Permutation) and isinstance(b, Permutation):
        return a.shape == b.shape and (
            a.perm is b.inverse_perm or bool(torch.equal(a.perm, b.inverse_perm))
        )
    return a is b and a.symmetric


class Sum(LinearOperator):
    """``A₁ + A₂ + …`` of equally shaped operators."""

    _node_fields = ("terms",)

    def __init__(self, *terms: Any) -> None:
        if len(terms) == 1 and isinstance(terms[0], (list, tuple)):
            terms = tuple(terms[0])
        ts = harmonise(tuple([as_operator(t) for t in terms]))
        # plain loops, not generators: a damped solve builds this node cold
        first, symmetric, psd = ts[0], True, True
        for t in ts:
            if t.shape != first.shape:
                raise ShapeError(
                    f"cannot add {first._str()} of shape {first.shape} and {t._str()} of shape "
                    f"{t.shape}"
                )
            symmetric = symmetric and t.symmetric
            psd = psd and t.psd
        super().__init__(first.shape, first.dtype, first.device, symmetric=symmetric, psd=psd)
        self.terms = ts

    def _rebuild(self, **fields: Any) -> Sum:
        return Sum(*fields.get("terms", self.terms))

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        out = self.terms[0]._matmat(X)
        for t in self.terms[1:]:
            out = out + t._matmat(X)
        return out

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        out = self.terms[0]._rmatmat(X)
        for t in self.terms[1:]:
            out = out + t._rmatmat(X)
        return out

    def to_dense(self) -> torch.Tensor:
        return sum(t.to_dense() for t in self.terms)

    def _str(self) -> str:
        return "+".join(paren(t) if isinstance(t, Sum) else t._str() for t in self.terms)


class Product(LinearOperator):
    """``A₁·A₂·…``, applied right to left.

    Tagged symmetric PSD for the congruence pattern ``Xᵀ·M·X`` (``M`` PSD) and for ``Xᵀ·X``, which is
    how Gauss-Newton matrices ``Jᵀ·H·J`` are recognised.
    """

    _node_fields = ("factors",)

    def __init__(self, *factors: Any) -> None:
        if len(factors) == 1 and isinstance(factors[0], (list, tuple)):
            factors = tuple(factors[0])
        fs = harmonise(tuple(as_operator(f) for f in factors))
        for a, b in zip(fs, fs[1:]):
            if a.shape[1] != b.shape[0]:
                raise ShapeError(
                    f"cannot multiply {a._str()} of shape {a.shape} by {b._str()} of shape {b.shape}"
                )
        sym = psd = False
        if len(fs) == 1:
            sym, psd = fs[0].symmetric, fs[0].psd
        elif is_transpose_of(fs[0], fs[-1]):
            middle = fs[1:-1]
            if len(middle) == 0:
                sym = psd = True
            elif len(middle) == 1:
                sym, psd = middle[0].symmetric, middle[0].psd
        orth = all(f.orthogonal for f in fs) and all(f.shape[0] == f.shape[1] for f in fs)
        super().__init__(
            (fs[0].shape[0], fs[-1].shape[1]),
            fs[0].dtype,
            fs[0].device,
            symmetric=sym,
            psd=psd,
            orthogonal=orth,
        )
        self.factors = fs

    def _rebuild(self, **fields: Any) -> Product:
        return Product(*fields.get("factors", self.factors))

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        if X.shape[1] == 1 and self._bordered() is not None:
            out = X.new_empty(self.shape[0], 1)
            if self._bordered_into(X, out):
                return out
        for f in reversed(self.factors):
            X = f._matmat(X)
        return X

    def _matmat_into(self, X: torch.Tensor, out: torch.Tensor) -> None:
        """The factors right to left, the leftmost one writing into ``out``; ``Pᵀ·(G⊗A)·P`` and
        ``Pᵀ·Eig[G⊗A]·P`` with ``P`` an :class:`~nngeo_ops.ops.AppendColumn` (KFAC and EKFAC
        blocks with a bias) in one routine (:meth:`~nngeo_ops.ops.Kronecker.bordered_into`) that
        never forms ``P x``."""
        if X.shape[1] == 1 and self._bordered_into(X, out):
            return
        fs = self.factors
        for f in reversed(fs[1:]):
            X = f._matmat(X)
        fs[0]._matmat_into(X, out)

    def _bordered(self) -> tuple | None:
        """``(K, evals, rows, cols)`` when the product is ``Pᵀ·M·P`` with ``P`` an AppendColumn
        ``(rows, cols)`` and ``M`` a Kronecker node ``K`` (``evals`` None) or an eigen form over a
        Kronecker basis ``K`` (a KFAC or an EKFAC block with a bias), else None (found once per
        node)."""
        hit = self.__dict__.get("_bordered_pattern", False)
        if hit is False:
            from .eigen import Eigen
            from .kronecker import Kronecker
            from .permutation import AppendColumn

            def layout(f: LinearOperator, inverse: bool) -> tuple | None:
                # (rows, cols) of an AppendColumn, or of the transpose of one, in that direction
                if isinstance(f, Transpose):
                    f, inverse = f.child, not inverse
                if isinstance(f, AppendColumn) and f.inverse == inverse:
                    return f.rows, f.cols
                return None

            hit = middle = None
            fs = self.factors
            if len(fs) == 3 and isinstance(fs[1], Kronecker):
                middle = (fs[1], None)
            elif len(fs) == 3 and isinstance(fs[1], Eigen) and isinstance(fs[1].Q, Kronecker):
                middle = (fs[1].Q, fs[1].evals)
            if middle is not None:
                split, interleave = layout(fs[0], True), layout(fs[2], False)
                if split is not None and split == interleave:
                    hit = (*middle, *split)
            self.__dict__["_bordered_pattern"] = hit
        return hit

    def _bordered_into(self, X: torch.Tensor, out: torch.Tensor) -> bool:
        hit = self._bordered()
        if hit is None:
            return False
        kron, evals, rows, cols = hit
        return kron.bordered_into(rows, cols, X.view(-1), out.view(-1), evals)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        for f in self.factors:
            X = f._rmatmat(X)
        return X

    def _str(self) -> str:
        return "·".join(paren(f) for f in self.factors)


class Scale(LinearOperator):
    """``c·A`` for a scalar ``c`` (a number or a 0-dim tensor, through which gradients flow)."""

    _node_fields = ("child",)

    def __init__(self, c: Scalar, child: Any) -> None:
        child = as_operator(child)
        cf = scalar_float(c)
        super().__init__(
            child.shape,
            child.dtype,
            child.device,
            symmetric=child.symmetric,
            psd=child.psd and cf >= 0,
        )
        self.c, self.child = c, child
        self.flexible = getattr(child, "flexible", False)

    def _rebuild(self, **fields: Any) -> Scale:
        return Scale(self.c, fields.get("child", self.child))

    def leaf_tensors(self):
        """The scale ``c`` when it is a tensor, then the child's leaf tensors."""
        if isinstance(self.c, torch.Tensor):
            yield self.c
        yield from self.child.leaf_tensors()

    def _to(self, dtype: torch.dtype | None = None, device: Any = None) -> Scale:
        c = self.c.to(dtype=dtype, device=device) if isinstance(self.c, torch.Tensor) else self.c
        return Scale(c, self.child.to(dtype, device))

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.c * self.child._matmat(X)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.c * self.child._rmatmat(X)

    def to_dense(self) -> torch.Tensor:
        return self.c * self.child.to_dense()

    def _str(self) -> str:
        return f"{fmt_scalar(self.c)}·{paren(self.child)}"


class Transpose(LinearOperator):
    """``Aᵀ`` of an ``(m, n)`` node, shape ``(n, m)``: its products are the child's transposed
    products."""

    _node_fields = ("child",)

    def __init__(self, child: Any) -> None:
        child = as_operator(child)
        m, n = child.shape
        super().__init__(
            (n, m),
            child.dtype,
            child.device,
            symmetric=child.symmetric,
            psd=child.psd,
            orthogonal=child.orthogonal and m == n,
        )
        self.child = child

    def _rebuild(self, **fields: Any) -> Transpose:
        return Transpose(fields.get("child", self.child))

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.child._rmatmat(X)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.child._matmat(X)

    def to_dense(self) -> torch.Tensor:
        return self.child.to_dense().mT

    def _str(self) -> str:
        s = self.child._str()
        return f"{s}ᵀ" if s.replace("_", "").isalnum() else f"({s})ᵀ"
