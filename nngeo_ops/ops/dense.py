"""``Dense(M)``: an explicit matrix."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ArgumentTypeError, NotPSDError, SingularError
from ..linalg.symv import symv, symv_applies
from .base import LinearOperator
from .cache import cached_factor
from .leaf_checks import check_finite, check_symmetric_tag, records_grad


def _robust_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh in float64 (complex128) when the working precision's solver did not converge.

    LAPACK's divide-and-conquer also fails on float64 matrices whose entries span an extreme range
    (e.g. a Fisher block of a saturated softmax, ~1e-117): the matrix is then scaled to unit largest
    entry, which leaves the eigenvectors unchanged, and if that fails too the slower
    QR-iteration driver (scipy's ``driver="ev"``) is taken.
    """
    wide = torch.complex128 if M.is_complex() else torch.float64
    W = M.to(wide)
    if M.dtype != wide:  # a wide matrix has just failed in its own precision: not tried again
        try:
            evals, Q = torch.linalg.eigh(W)
            return evals.to(M.real.dtype), Q.to(M.dtype)
        except RuntimeError:
            pass
    scale = (
        W.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    )  # unit largest entry (0 stays 0)
    try:
        evals, Q = torch.linalg.eigh(W / scale)
    except RuntimeError:  # LAPACK's QR iteration (?syev): slower, converges where D&C fails
        import scipy.linalg

        e, v = scipy.linalg.eigh((W / scale).detach().cpu().numpy(), driver="ev")
        evals = torch.from_numpy(e).to(W.device)
        Q = torch.from_numpy(v).to(W.device)
    return (evals * scale.real).to(M.real.dtype), Q.to(M.dtype)


class Dense(LinearOperator):
    """An explicit ``m × n`` matrix ``M``.

    Args:
        M: a 2-D floating tensor.
        symmetric: tag; ``None`` detects exact symmetry (``M == Mᵀ``) for square ``M``.
        psd: tag, verified when the matrix is first factorised: a Cholesky that fails, or an
            eigendecomposition with an eigenvalue below ``−√eps·max|λ|``, on a node tagged PSD
            raises :class:`~nngeo_ops.errors.NotPSDError`. Symmetry implied by ``symmetric=True``
            or ``psd=True`` is verified at construction, to ``√eps·max|M|`` (O(n²)).
        orthogonal: tag for orthonormal columns.
        name: how the node prints (default ``M``).

    NaN / inf entries raise :class:`~nngeo_ops.errors.NonFiniteError` when the matrix is first
    factorised (the check of every other leaf runs at construction).
    """

    _tensor_fields = ("M",)

    def __init__(
        self,
        M: torch.Tensor,
        *,
        symmetric: bool | None = None,
        psd: bool = False,
        orthogonal: bool = False,
        name: str = "M",
    ) -> None:
        if not isinstance(M, torch.Tensor) or M.dim() != 2:
            raise ArgumentTypeError(
                f"Dense expects a 2-D tensor, got {getattr(M, 'shape', type(M))}"
            )
        if not M.is_floating_point() and not M.is_complex():
            raise ArgumentTypeError(f"Dense expects a floating tensor, got {M.dtype}")
        square = M.shape[0] == M.shape[1]
        # exact: M = Mᵀ bitwise (a tag checked to its tolerance is not enough for symv)
        exact = False
        if (symmetric or psd) and square and M.is_floating_point():
            exact = check_symmetric_tag(M, f"Dense {name} ({M.shape[0]}×{M.shape[1]})") == 0.0
        elif symmetric is None:
            exact = square and bool(torch.equal(M, M.mT))
        if symmetric is None:
            symmetric = psd or exact
        super().__init__(
            M.shape, M.dtype, M.device, symmetric=symmetric, psd=psd, orthogonal=orthogonal
        )
        self.M = M
        self.name = name
        self._mark_exact(exact)

    def _mark_exact(self, exact: bool) -> None:
        # M's version when it was seen to equal Mᵀ bitwise: its products may then read one triangle
        # (linalg.symv); an in-place change of M since then (a new version) turns that route off
        self._exact_version = self.M._version if exact else None

    def _symv(self, x: torch.Tensor) -> bool:
        """Whether ``M x`` for this one column may go through :func:`~nngeo_ops.linalg.symv.symv`."""
        return (
            self.__dict__.get("_exact_version") == self.M._version
            and type(self) is Dense
            and symv_applies(self.M, x)
        )

    def _rebuild(self, **fields: Any) -> Dense:
        return Dense(
            fields.get("M", self.M),
            symmetric=self.symmetric,
            psd=self.psd,
            orthogonal=self.orthogonal,
            name=self.name,
        )

    def _to(self, dtype: torch.dtype | None = None, device: Any = None) -> Dense:
        # The tags were verified on this matrix at its own precision, and a conversion rounds M and
        # Mᵀ entry by entry alike, so the symmetry check is not repeated: in float64 it would refuse
        # the round-off of a float32 matrix that float32's tolerance (√eps₃₂ ≫ √eps₆₄) accepted.
        M = self.M.to(dtype=dtype if self.M.is_floating_point() else None, device=device)
        out = Dense.__new__(Dense)
        LinearOperator.__init__(
            out,
            M.shape,
            M.dtype,
            M.device,
            symmetric=self.symmetric,
            psd=self.psd,
            orthogonal=self.orthogonal,
        )
        out.M, out.name = M, self.name
        # rounding entry by entry keeps M = Mᵀ bitwise
        out._mark_exact(self.__dict__.get("_exact_version") == self.M._version)
        return out

    # CPU BLAS is 5-10× slower on A @ X with a column-major A and a few columns than on the same
    # product written (Xᵀ Aᵀ)ᵀ, whose large operand is then row-major (benchmarks/README.md, curvature
    # section, "Where we are not the fastest"). Products are arranged so that M is always read in its own layout:
    # eigh returns column-major bases, and Qᵀ X is the other half of every eigen-form product.
    # One column of a bitwise symmetric M reads one triangle (BLAS symv, ~0.65× the time of
    # torch's gemv over the whole matrix on CPU: the product is bound by memory traffic).
    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        if X.shape[1] == 1 and self._symv(X):
            return symv(self.M, X)
        if self._colmajor:
            return (X.mT @ self.M.mT).mT
        return self.M @ X

    def _mv(self, x: torch.Tensor) -> torch.Tensor:
        if self._symv(x):
            return symv(self.M, x)
        return self.M @ x

    def _matmat_into(self, X: torch.Tensor, out: torch.Tensor) -> None:
        # the product itself goes to out (a column-major M keeps its faster transposed product;
        # a subclass such as ShiftedDense has products of its own)
        if type(self) is not Dense or self._colmajor or records_grad(self.M, X, out):
            out.copy_(self._matmat(X))
        elif X.shape[1] == 1 and out.is_contiguous() and self._symv(X):
            symv(self.M, X, out=out)
        else:
            torch.matmul(self.M, X, out=out)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        if X.shape[1] == 1 and self._symv(X):
            return symv(self.M, X)
        if self._colmajor:
            return self.M.mT @ X
        return (X.mT @ self.M).mT

    @property
    def _colmajor(self) -> bool:
        M = self.M
        return M.stride(0) == 1 and M.stride(1) != 1

    def to_dense(self) -> torch.Tensor:
        return self.M

    def _str(self) -> str:
        return self.name

    # ---- factorisations, cached on the leaf
    def eigh_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ, Q)`` with ``M = Q diag(λ) Qᵀ`` (ascending ``λ``), ``Q`` row-major.

        Float32 is factorised in float32: eigh is backward stable, so the computed pair is exact for
        a matrix within ~eps·‖M‖ of ``M``, which is as well as a float32 ``M`` (a sum of rounded
        products) is known; float64 would double the cost and add no information. Float64 is the
        fallback when the float32 solver does not converge; half precisions are factorised in
        float64 and cast back.
        """
        self.require_symmetric("eigh")

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            _check_finite(self.M, "eigh")
            return self._eigh_of(self.M)

        return cached_factor(self, "eigh", compute)

    def _eigh_of(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`eigh_factors` of the matrix ``M`` (this node's, or a shifted copy of it)."""
        evals = Q = None
        if M.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128):
            try:
                evals, Q = torch.linalg.eigh(M)
            except RuntimeError:  # no convergence (ill-conditioned float32): retry in float64
                pass
        if Q is None:
            evals, Q = _robust_eigh(M)
        self._check_psd_spectrum(evals)
        # eigh returns column-major Q; row-major makes the Kronecker products ~10× faster
        return evals, Q.contiguous()

    def _check_psd_spectrum(self, evals: torch.Tensor) -> None:
        """Raise NotPSDError when the node is tagged PSD and ``evals`` has an entry below
        ``−√eps·max|λ|``."""
        if self.psd and evals.numel():
            top = float(evals.detach().abs().max())
            low = float(evals.detach().min())
            if low < -(torch.finfo(evals.dtype).eps ** 0.5) * top:
                raise NotPSDError(
                    f"{self._str()} ({self.shape[0]}×{self.shape[1]}) was tagged psd=True but "
                    f"has eigenvalue {low:.3g} (largest magnitude {top:.3g}); drop psd=True "
                    "or fix the matrix"
                )

    @property
    def factor_dtype(self) -> torch.dtype:
        """The dtype of the Cholesky / LU factors: float32 for half precisions (torch has no
        half-precision kernels for them, and 8-11 bits of mantissa do not carry a
        factorisation); solves cast the right-hand side there and the result back."""
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    # how a failed factorisation tells the caller to fix it (a damped node: "add more damping")
    _DAMPING_FIX = "add damping (A + c·I)"

    def _factor_input(self, what: str) -> tuple[torch.Tensor, bool]:
        """The matrix :meth:`cholesky_factor` and :meth:`lu_factors` factorise, in
        :attr:`factor_dtype`, checked finite, and whether they may overwrite it (``out=`` aliasing
        the input: only a private copy; ``M`` itself, or its cast, is factorised out of place)."""
        _check_finite(self.M, what)
        return self.M.to(self.factor_dtype), False

    def cholesky_factor(self) -> torch.Tensor:
        """Lower ``L`` with ``M = L Lᵀ`` (in :attr:`factor_dtype`); raises NotPSDError when ``M``
        is not positive definite."""

        def compute() -> torch.Tensor:
            A, in_place = self._factor_input("Cholesky")
            if in_place:
                info = torch.empty((), dtype=torch.int32, device=A.device)
                L, info = torch.linalg.cholesky_ex(A, out=(A, info))
            else:
                L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:
                raise NotPSDError(
                    f"Cholesky of {self._str()} ({self.shape[0]}×{self.shape[1]}) failed at pivot "
                    f"{int(info)}: the matrix is not positive definite; {self._DAMPING_FIX} or "
                    "build it without psd=True"
                )
            return L

        return cached_factor(self, "cholesky", compute)

    def lu_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LU factorisation ``(LU, pivots)`` of ``torch.linalg.lu_factor`` in ``factor_dtype``, cached
        on the leaf; raises :class:`~nngeo_ops.errors.SingularError` at a zero pivot.
        """

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            A, in_place = self._factor_input("LU")
            if in_place:
                piv = torch.empty(self.shape[0], dtype=torch.int32, device=A.device)
                info = torch.empty((), dtype=torch.int32, device=A.device)
                LU, piv, info = torch.linalg.lu_factor_ex(A, out=(A, piv, info))
            else:
                LU, piv, info = torch.linalg.lu_factor_ex(A)
            if int(info) != 0:
                raise SingularError(
                    f"{self._str()} ({self.shape[0]}×{self.shape[1]}) is singular (zero pivot "
                    f"{int(info)}); {self._DAMPING_FIX} before solving"
                )
            return LU, piv

        return cached_factor(self, "lu", compute)


def _check_finite(M: torch.Tensor, what: str) -> None:
    check_finite(M, f"{what}: the matrix")
