"""``ShiftedDense(A, s)``: ``M + c·I`` or ``M + diag(d)`` over a dense ``A = Dense(M)``, never stored.

Damping a large dense block (``F + λ·I`` of a block-diagonal Fisher: one 20 490² float32 block is
1.6 GB) must not keep ``M + λI`` beside ``M`` and its factor. This node shares ``M`` with the
undamped node (the same tensor, no copy) and holds only the shift:

- products: ``(M + s) X = M X + s ⊙ X`` (``s`` a scalar, or ``d`` broadcast along the rows);
- Cholesky / LU: ``M`` is copied once into :attr:`~Dense.factor_dtype`, in column-major order (the
  layout LAPACK factorises without a temporary), the shift is added to the copy's diagonal, and the
  copy is factorised in place (``out=`` aliasing the input): the first solve allocates one block
  and the node then holds ``M`` (shared) and its factor ``L`` only;
- eigh: ``M + c·I = Q (Λ + c) Qᵀ`` from the base node's eigendecomposition when that is already
  cached (exact), else of a shifted copy;
- diag / trace / Frobenius norm: from ``M``'s diagonal and the shift (the norm a block of rows at a
  time), no ``n × n`` temporary.

``.M`` still gives the matrix ``M + s`` (materialised on each access, not cached) for the routines of
:class:`Dense` that read it (products of two dense nodes, fallbacks, ``to_dense``).

Tags: symmetric when ``A`` is (a diagonal shift keeps ``Mᵀ = M``; no O(n²) check); PSD when ``A`` is
and every shift entry is ``≥ 0``. Caches are keyed by the fingerprint of ``M`` and of a tensor
shift, so an in-place change of either gives a fresh factor.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ArgumentTypeError, ShapeError
from .base import LinearOperator, fmt_scalar, is_scalar
from .cache import cached_factor, cached_on
from .dense import Dense
from .leaf_checks import check_finite, finite_range

_ROWS_CHUNK = 1 << 22  # entries of M (plus its shift) copied at a time by frobenius()


class ShiftedDense(Dense):
    """``M + c·I`` (``shift`` a number or a 0-dim tensor) or ``M + diag(d)`` (``shift`` a vector of
    length ``n``) over a square dense node ``A = Dense(M)``, sharing ``M``.

    Args:
        A: the square :class:`Dense` node of ``M``; its tags give this node's (see the module
            docstring). A ``ShiftedDense`` base adds its shift to ``shift``.
        shift: ``c`` or ``d``.

    Attributes:
        source: the :class:`Dense` node of ``M`` (whose cached eigendecomposition eigh reuses).
        base: ``M`` itself (``source.M``).
        shift: ``c`` or ``d``.
    """

    _tensor_fields = ("base", "shift")

    def __init__(self, A: Dense, shift: Any) -> None:
        if not isinstance(A, Dense):
            raise ArgumentTypeError(f"ShiftedDense expects a Dense node, got {type(A).__name__}")
        if A.shape[0] != A.shape[1]:
            raise ShapeError(f"ShiftedDense needs a square matrix, got shape {A.shape}")
        if isinstance(A, ShiftedDense):  # (M + s₁) + s₂ = M + (s₁ + s₂)
            shift, A = A.shift + shift, A.source
        n = A.shape[0]
        if is_scalar(shift):
            entries = (shift if isinstance(shift, torch.Tensor) else torch.tensor(shift)).reshape(1)
        elif isinstance(shift, torch.Tensor) and shift.dim() == 1 and shift.shape[0] == n:
            entries = shift
        else:
            raise ArgumentTypeError(
                f"ShiftedDense: the shift must be a scalar or a vector of length {n}, got "
                f"{getattr(shift, 'shape', type(shift))}"
            )
        # one reduction: finiteness, and whether the shift keeps a PSD base PSD (lo ≥ 0; NaN for
        # a complex shift, which does not)
        lo, _ = finite_range(entries, f"ShiftedDense {A.name}: the shift")
        LinearOperator.__init__(
            self, A.shape, A.dtype, A.device, symmetric=A.symmetric, psd=A.psd and lo >= 0
        )
        self.source = A
        self.shift = shift
        self.name = A.name

    @property
    def base(self) -> torch.Tensor:
        """``M``, the tensor of :attr:`source` (shared, never copied by this node)."""
        return self.source.M

    @property
    def M(self) -> torch.Tensor:  # type: ignore[override]
        """``M + shift`` as a new ``n × n`` tensor (not cached: this node's own routines never
        build it; it serves the generic :class:`Dense` routes such as ``Dense·Dense`` products)."""
        return self._shifted_copy(self.dtype, colmajor=False)

    @property
    def scalar_shift(self) -> bool:
        """Whether the shift is ``c·I`` (else ``diag(d)``)."""
        return is_scalar(self.shift)

    def _rebuild(self, **fields: Any) -> ShiftedDense:
        base = fields.get("base", self.base)
        A = self.source if base is self.base else self.source._rebuild(M=base)
        return ShiftedDense(A, fields.get("shift", self.shift))

    def _to(self, dtype: torch.dtype | None = None, device: Any = None) -> ShiftedDense:
        # the base through its own .to(), so that a base shared in the tree stays shared
        s = self.shift
        if isinstance(s, torch.Tensor):
            s = s.to(dtype=dtype if s.is_floating_point() else None, device=device)
        return ShiftedDense(self.source.to(dtype, device), s)

    # ---- products: M X + s ⊙ X, with M read in its own layout (Dense's products)
    def _shift_rows(self) -> Any:
        return self.shift if self.scalar_shift else self.shift.unsqueeze(1)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.source._matmat(X) + self._shift_rows() * X

    def _mv(self, x: torch.Tensor) -> torch.Tensor:
        return self.source._mv(x) + self.shift * x

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.source._rmatmat(X) + self._shift_rows() * X

    @property
    def _colmajor(self) -> bool:
        return self.source._colmajor

    def to_dense(self) -> torch.Tensor:
        return self.M

    def _str(self) -> str:
        s = f"{fmt_scalar(self.shift)}·I" if self.scalar_shift else "diag"
        return f"({self.source._str()} + {s})"

    # ---- entries without the n × n matrix
    def diagonal(self) -> torch.Tensor:
        """``diag(M) + s`` (a new vector)."""
        return self.base.diagonal() + self.shift

    def trace_value(self) -> torch.Tensor:
        """``tr M + n·c`` or ``tr M + Σ dᵢ``."""
        t = self.base.diagonal().sum()
        return t + (self.shift * self.shape[0] if self.scalar_shift else self.shift.sum())

    def frobenius(self) -> torch.Tensor:
        """``‖M + s‖_F``, from blocks of rows of ``M`` with the shift added (at most
        ``_ROWS_CHUNK`` entries copied at a time; summing ``‖M‖² + 2 sᵀdiag(M) + ‖s‖²`` instead
        would cancel when ``s ≈ −diag(M)``)."""
        B, n = self.base, self.shape[0]
        rows = max(1, _ROWS_CHUNK // max(n, 1))
        parts = []
        for i in range(0, n, rows):
            j = min(n, i + rows)
            blk = B[i:j].clone()
            blk.diagonal(offset=i).add_(self.shift if self.scalar_shift else self.shift[i:j])
            parts.append(torch.linalg.vector_norm(blk))
        if not parts:
            return torch.zeros((), dtype=B.real.dtype, device=B.device)
        return torch.linalg.vector_norm(torch.stack(parts))

    # ---- factorisations: one shifted copy, factorised in place
    def _shifted_copy(self, dtype: torch.dtype, colmajor: bool) -> torch.Tensor:
        """``M + s`` as a new tensor of ``dtype``; column-major when ``colmajor`` (a symmetric
        row-major ``M`` is read through ``Mᵀ``, the same matrix, so the copy is a plain one).

        Differentiable (a copy, then an in-place add on the copy)."""
        B = self.base
        if colmajor:
            recording = torch.is_grad_enabled() and B.requires_grad
            if self.symmetric and not recording and B.is_contiguous():
                B = B.mT  # = M (symmetric), already column-major; not under autograd: the
                # gradient would arrive transposed
            if B.mT.is_contiguous():
                T = B.to(dtype, copy=True)  # preserve_format keeps the column-major strides
            else:  # a transposing copy into column-major storage
                T = torch.empty(B.shape[::-1], dtype=dtype, device=B.device).mT
                T.copy_(B)
        else:
            T = B.to(dtype, copy=True)
        T.diagonal().add_(self.shift)
        return T

    def _check_finite(self, what: str) -> None:
        # M may have changed in place since construction (the shift was checked then; a tensor
        # shift changed in place is checked again, O(n))
        check_finite(self.base, f"{what}: the matrix")
        if isinstance(self.shift, torch.Tensor):
            check_finite(self.shift, f"{what}: the shift")

    _DAMPING_FIX = "add more damping"

    def _factor_input(self, what: str) -> tuple[torch.Tensor, bool]:
        """A shifted column-major copy of ``M`` in :attr:`factor_dtype`, which :meth:`Dense.cholesky_factor`
        and :meth:`Dense.lu_factors` factorise in place where ``out=`` aliasing the input is
        verified: on CPU (LAPACK works in place, the result is the copy itself); elsewhere, and
        under autograd (``out=`` records no graph), out of place."""
        self._check_finite(what)
        T = self._shifted_copy(self.factor_dtype, colmajor=True)
        return T, T.device.type == "cpu" and not T.requires_grad

    def eigh_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ, Q)`` with ``M + s = Q diag(λ) Qᵀ``: for ``s = c·I`` and an eigendecomposition of
        ``M`` already cached on :attr:`source`, that one with ``λ = λ_M + c`` (the same ``Q``);
        else the eigendecomposition of a shifted copy (see :meth:`Dense.eigh_factors`)."""
        self.require_symmetric("eigh")

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            if self.scalar_shift and "eigh" in cached_on(self.source):
                evals, Q = self.source.eigh_factors()
                evals = evals + self.shift
                self._check_psd_spectrum(evals)
                return evals, Q
            self._check_finite("eigh")
            return self._eigh_of(self._shifted_copy(self.dtype, colmajor=False))

        return cached_factor(self, "eigh", compute)
