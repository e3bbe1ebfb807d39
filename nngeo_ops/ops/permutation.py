"""``Permutation(perm)``: reorders coordinates."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .base import LinearOperator
from .leaf_checks import records_grad


class Permutation(LinearOperator):
    """The permutation matrix ``P`` with ``(P x)[i] = x[perm[i]]``; orthogonal, ``Pᵀ = P⁻¹``.

    It maps between two orderings of the same coordinates, e.g. the interleaved order of a Kronecker
    factorisation and the parameter order of a layer (weights, then bias).
    """

    _tensor_fields = ("perm",)

    def __init__(
        self,
        perm: torch.Tensor,
        dtype: torch.dtype | None = None,
        device: Any = None,
        *,
        name: str = "P",
        _inverse: torch.Tensor | None = None,
        _symmetric: bool | None = None,
    ):
        perm = torch.as_tensor(perm, dtype=torch.long)
        n = perm.numel()
        # O(n) checks and inverse (no sort): permutations of whole layers have ~10⁵ entries. A
        # caller passing `_symmetric` built perm and its inverse itself (AppendColumn): no checks
        if _symmetric is None and (
            perm.dim() != 1
            or (n and (int(perm.min()) < 0 or int(perm.max()) >= n))
            or not bool((torch.bincount(perm, minlength=n) == 1).all())
        ):
            raise InvalidArgumentError("Permutation: perm must be a permutation of 0..n-1")
        if _inverse is None:
            _inverse = torch.empty_like(perm)
            _inverse[perm] = torch.arange(n, device=perm.device)
        super().__init__(
            (n, n),
            dtype or torch.get_default_dtype(),
            device if device is not None else perm.device,
            symmetric=bool(torch.equal(perm, _inverse)) if _symmetric is None else _symmetric,
            orthogonal=True,
        )
        self.perm = perm.to(self.device)
        self.inverse_perm = _inverse.to(self.device)
        self.name = name

    def _rebuild(self, **fields: Any) -> Permutation:
        return Permutation(fields.get("perm", self.perm), self.dtype, self.device, name=self.name)

    def _to(self, dtype: torch.dtype | None = None, device: Any = None) -> Permutation:
        return Permutation(
            self.perm,
            dtype or self.dtype,
            device or self.device,
            name=self.name,
            _inverse=self.inverse_perm,
        )

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return X[self.perm]

    def _matmat_into(self, X: torch.Tensor, out: torch.Tensor) -> None:
        if records_grad(X, out):
            out.copy_(X[self.perm])
        else:
            torch.index_select(X, 0, self.perm, out=out)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return X[self.inverse_perm]

    def transpose(self) -> Permutation:
        """``Pᵀ = P⁻¹`` as a permutation node (the inverse permutation); one node per node, so that
        rewriting ``Pᵀ`` again (each first solve of a damped KFAC block does) costs nothing."""
        t = self.__dict__.get("_transposed")
        if t is None:
            name = self.name[:-1] if self.name.endswith("ᵀ") else self.name + "ᵀ"
            t = self._make_transpose(name)
            t.__dict__["_transposed"] = self
            self.__dict__["_transposed"] = t
        return t

    def _make_transpose(self, name: str) -> Permutation:
        return Permutation(
            self.inverse_perm,
            self.dtype,
            self.device,
            name=name,
            _inverse=self.perm,
            _symmetric=self.symmetric,
        )

    def sign(self) -> int:
        """``det P = ±1``: the parity of the permutation (from its cycle lengths)."""
        perm, seen, sign = self.perm.tolist(), [False] * self.shape[0], 1
        for i in range(len(perm)):
            j, length = i, 0
            while not seen[j]:
                seen[j], j, length = True, perm[j], length + 1
            if length and length % 2 == 0:
                sign = -sign
        return sign

    def _str(self) -> str:
        return self.name


class AppendColumn(Permutation):
    """The permutation ``[vec(W); c] ↦ vec([W | c])`` for W of shape (rows, cols) row-major and c of
    length rows: a layer's parameters (weights, then bias) into the interleaved order of a Kronecker
    factorisation with the bias as an extra input. ``inverse=True`` is the transpose.

    The same matrix as ``Permutation(perm)``; products are a concatenation of views instead of a
    gather (~10× faster for a layer of 2·10⁵ parameters).
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        dtype: torch.dtype | None = None,
        device: Any = None,
        *,
        inverse: bool = False,
        name: str = "P",
    ):
        dev = torch.device(device) if device is not None else torch.get_default_device()
        perm, inv, sym = _append_column_perms(int(rows), int(cols), dev)
        if inverse:
            perm, inv = inv, perm
        super().__init__(perm, dtype, dev, name=name, _inverse=inv, _symmetric=sym)
        self.rows, self.cols, self.inverse = rows, cols, inverse

    # Both directions copy X once, straight into the result: the weights as one strided copy, the
    # biases as another (the former split made the weights contiguous first, then concatenated:
    # two copies of the layer's size).
    def _interleave_into(self, X: torch.Tensor, out: torch.Tensor) -> None:
        """``out ← vec([W | c])`` from ``X = [vec(W); c]`` (``out`` contiguous)."""
        k, w, cols = X.shape[1], self.rows * self.cols, self.cols
        O = out.view(self.rows, cols + 1, k)
        O[:, :cols].copy_(X[:w].reshape(self.rows, cols, k))
        O[:, cols].copy_(X[w:])

    def _split_into(self, X: torch.Tensor, out: torch.Tensor) -> None:
        """``out ← [vec(W); c]`` from ``X = vec([W | c])`` (``out`` contiguous)."""
        k, w, cols = X.shape[1], self.rows * self.cols, self.cols
        Y = X.reshape(self.rows, cols + 1, k)
        out[:w].view(self.rows, cols, k).copy_(Y[:, :cols])
        out[w:].copy_(Y[:, cols])

    def _apply(self, X: torch.Tensor, out: torch.Tensor, split: bool) -> None:
        if not out.is_contiguous():
            out.copy_(self._matmat(X) if split == self.inverse else self._rmatmat(X))
        elif split:
            self._split_into(X, out)
        else:
            self._interleave_into(X, out)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        out = X.new_empty(X.shape)
        self._apply(X, out, self.inverse)
        return out

    def _matmat_into(self, X: torch.Tensor, out: torch.Tensor) -> None:
        self._apply(X, out, self.inverse)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        out = X.new_empty(X.shape)
        self._apply(X, out, not self.inverse)
        return out

    def _make_transpose(self, name: str) -> AppendColumn:
        return AppendColumn(
            self.rows, self.cols, self.dtype, self.device, inverse=not self.inverse, name=name
        )

    def _to(self, dtype: torch.dtype | None = None, device: Any = None) -> AppendColumn:
        return AppendColumn(
            self.rows,
            self.cols,
            dtype or self.dtype,
            device or self.device,
            inverse=self.inverse,
            name=self.name,
        )


@functools.lru_cache(maxsize=128)
def _append_column_perms(
    rows: int, cols: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The index vectors of :class:`AppendColumn` (forward, inverse) and whether they are equal,
    built once per layer shape and device and shared, read-only, by every node of that shape: a
    KFAC build and each first damped solve (which rewrites ``Pᵀ``) would otherwise rebuild them
    (~2 ms for a layer of 2·10⁵ parameters). Sharing the tensors also keeps the nodes'
    fingerprints, hence the caches keyed by them, equal across builds."""
    r = torch.arange(rows, device=device)[:, None]
    j = torch.arange(cols + 1, device=device)[None, :]
    perm = torch.where(j < cols, r * cols + j, rows * cols + r).reshape(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=device)
    return perm, inv, bool(torch.equal(perm, inv))
