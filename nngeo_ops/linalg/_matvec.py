"""Operator normalisation: every algorithm in :mod:`nngeo_ops.linalg` sees one small record.

The algorithms are written against :class:`MatmatOperator` only, so that they work alike on dense
tensors, on the lazy nodes of :mod:`nngeo_ops.ops` (by duck typing: this module never imports them)
and on plain Python callables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nngeo_ops.errors import DTypeDeviceError, NotSymmetricError, ShapeError, UnsupportedError

__all__ = ["MatmatOperator", "as_matmat", "as_square_matmat", "check_symmetric_if_dense"]

Matmat = Callable[[torch.Tensor], torch.Tensor]


def _default_device() -> torch.device:
    # torch.get_default_device() only exists in recent torch; an empty tensor works everywhere.
    return torch.empty(0).device


@dataclass(frozen=True)
class MatmatOperator:
    """A linear map ``A: R^n -> R^m`` known through products with (n, k) matrices.

    Attributes:
        shape: ``(m, n)``.
        dtype, device: those of the products; inputs must match them.
        symmetric: True when the caller declared ``A = Aᵀ``; then ``rmatmat`` is ``matmat``.
        description: a short human name used in error messages.

    ``matmat(X)`` maps an (n, k) tensor to an (m, k) tensor and checks both shapes, so that a
    wrong callable is reported where it is called rather than deep inside an algorithm.
    ``rmatmat(Y)`` computes ``Aᵀ Y`` when a transpose is known (tensor, ``.T`` attribute,
    ``symmetric=True``) and raises :class:`UnsupportedError` otherwise.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    _matmat: Matmat = field(repr=False)
    _rmatmat: Matmat | None = field(default=None, repr=False)
    symmetric: bool = False
    description: str = "operator"

    @property
    def is_square(self) -> bool:
        """Whether ``m = n``."""
        return self.shape[0] == self.shape[1]

    @property
    def has_transpose(self) -> bool:
        """Whether ``Aᵀ X`` is available (symmetric, or an ``rmatmat`` was given)."""
        return self.symmetric or self._rmatmat is not None

    def _no_transpose(self) -> UnsupportedError:
        return UnsupportedError(
            f"the {self.description} has no transpose: give the object a .T attribute, "
            "pass a tensor, or declare symmetric=True if A = Aᵀ"
        )

    def _check_input(self, X: torch.Tensor, n: int, what: str) -> None:
        if not isinstance(X, torch.Tensor):
            raise DTypeDeviceError(f"{what} expects a torch.Tensor, got {type(X).__name__}")
        if X.ndim != 2 or X.shape[0] != n:
            raise ShapeError(
                f"{what} of the {self.description} of shape {self.shape} needs an ({n}, k) "
                f"matrix, got shape {tuple(X.shape)}"
            )
        if X.dtype != self.dtype or X.device != self.device:
            raise DTypeDeviceError(
                f"{what} of the {self.description} ({self.dtype}, {self.device}) got a tensor "
                f"with ({X.dtype}, {X.device}); convert it with .to(dtype=..., device=...)"
            )

    def _check_output(self, Y: object, m: int, k: int, what: str) -> torch.Tensor:
        if not isinstance(Y, torch.Tensor):
            raise DTypeDeviceError(
                f"{what} of the {self.description} returned {type(Y).__name__}, "
                "expected a torch.Tensor"
            )
        if tuple(Y.shape) != (m, k):
            raise ShapeError(
                f"{what} of the {self.description} of shape {self.shape} returned shape "
                f"{tuple(Y.shape)} for an input with {k} column(s); expected ({m}, {k}). "
                "A callable must map an (n, k) matrix to an (m, k) matrix."
            )
        if Y.dtype != self.dtype or Y.device != self.device:
            raise DTypeDeviceError(
                f"{what} of the {self.description} returned ({Y.dtype}, {Y.device}) but the "
                f"operator was declared ({self.dtype}, {self.device}); pass dtype=/device= to "
                "as_matmat to match what it returns"
            )
        return Y

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` for X of shape (n, k); returns (m, k)."""
        m, n = self.shape
        self._check_input(X, n, "matmat")
        return self._check_output(self._matmat(X), m, X.shape[1], "matmat")

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for x of shape (n,); returns (m,)."""
        return self.matmat(x.reshape(-1, 1) if x.ndim == 1 else x).reshape(-1)

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ Y`` for Y of shape (m, k); returns (n, k)."""
        m, n = self.shape
        if self.symmetric:
            return self.matmat(Y)
        if self._rmatmat is None:
            raise self._no_transpose()
        self._check_input(Y, m, "rmatmat")
        return self._check_output(self._rmatmat(Y), n, Y.shape[1], "rmatmat")

    @property
    def T(self) -> MatmatOperator:
        """The transposed operator (needs a known transpose, see :meth:`rmatmat`)."""
        if self.symmetric:
            return self
        if self._rmatmat is None:
            raise self._no_transpose()
        return MatmatOperator(
            shape=(self.shape[1], self.shape[0]),
            dtype=self.dtype,
            device=self.device,
            _matmat=self._rmatmat,
            _rmatmat=self._matmat,
            description=f"transpose of the {self.description}",
        )


def _looks_like_operator(A: object) -> bool:
    return all(hasattr(A, a) for a in ("shape", "dtype", "device")) and callable(
        getattr(type(A), "__matmul__", None)
    )


def _as_shape(shape: object, what: str) -> tuple[int, int]:
    try:
        out = tuple(int(s) for s in shape)  # type: ignore[union-attr]
    except TypeError as exc:
        raise ShapeError(f"{what} must be a pair (m, n), got {shape!r}") from exc
    if len(out) != 2 or min(out) < 0:
        raise ShapeError(f"{what} must be a pair (m, n) of sizes, got {shape!r}")
    return out  # type: ignore[return-value]


def _check_float(dtype: torch.dtype, what: str) -> None:
    # Complex operators are refused rather than half-supported: the probes and the Lanczos
    # recurrences here are written for real symmetric matrices.
    if not dtype.is_floating_point:
        raise DTypeDeviceError(
            f"{what} has dtype {dtype}; the linalg algorithms need a real floating dtype, "
            "convert with .to(torch.float64) or .float()"
        )


def as_matmat(
    A: object,
    shape: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    symmetric: bool = False,
) -> MatmatOperator:
    """Normalise ``A`` into a :class:`MatmatOperator`.

    Accepted forms:

    (a) a 2-D ``torch.Tensor`` ``A``: ``matmat(X) = A @ X``, ``rmatmat(Y) = Aᵀ @ Y``. A given
        ``dtype``/``device`` converts the matrix.
    (b) any object with ``.shape`` (a pair), ``.dtype``, ``.device`` and ``__matmul__`` mapping an
        (n, k) tensor to an (m, k) tensor (the lazy nodes of ``nngeo_ops.ops``); its ``.T``, when
        present, gives ``rmatmat``. A given dtype/device must match the object's.
    (c) a plain callable ``f(X)`` on (n, k) matrices; ``shape=`` is required, ``dtype``/``device``
        default to torch's defaults (``torch.get_default_dtype()``, the default device). No
        transpose unless ``symmetric=True``.
    (d) a :class:`MatmatOperator`, returned as is (``symmetric=True`` marks it symmetric).

    Args:
        A: the operator.
        shape: ``(m, n)``; required for callables, checked against ``A.shape`` otherwise.
        dtype, device: see above.
        symmetric: declare ``A = Aᵀ`` (not verified here; the algorithms that need it check
            dense tensors themselves).

    Raises:
        ShapeError: a tensor that is not 2-D, a shape that disagrees, a callable without shape.
        DTypeDeviceError: a non-floating dtype, a dtype/device that disagrees with the object's,
            or an ``A`` of none of the accepted kinds.
    """
    device = torch.device(device) if device is not None else None
    carried = getattr(A, "op", None)
    if (
        carried is not None
        and not isinstance(A, (torch.Tensor, MatmatOperator))
        and not _looks_like_operator(A)
        and _looks_like_operator(carried)
    ):
        A = carried  # a representation carrying its operator (PMat*/FMat* of nngeo_ops.nn)
    if isinstance(A, MatmatOperator):
        if shape is not None and _as_shape(shape, "shape") != A.shape:
            raise ShapeError(f"shape={tuple(shape)} disagrees with the operator's {A.shape}")
        if (dtype is not None and dtype != A.dtype) or (device is not None and device != A.device):
            raise DTypeDeviceError(
                f"the operator is ({A.dtype}, {A.device}); it cannot be re-declared as "
                f"({dtype}, {device})"
            )
        if symmetric and not A.symmetric:
            return MatmatOperator(
                A.shape, A.dtype, A.device, A._matmat, A._rmatmat, True, A.description
            )
        return A

    if isinstance(A, torch.Tensor):
        if A.ndim != 2:
            raise ShapeError(
                f"a tensor operator must be a 2-D matrix, got shape {tuple(A.shape)}; "
                "flatten it or wrap a matvec as a callable with shape="
            )
        if shape is not None and _as_shape(shape, "shape") != tuple(A.shape):
            raise ShapeError(f"shape={tuple(shape)} disagrees with the tensor's {tuple(A.shape)}")
        M = A.to(dtype=dtype or A.dtype, device=device or A.device)
        _check_float(M.dtype, "the matrix")
        return MatmatOperator(
            shape=(M.shape[0], M.shape[1]),
            dtype=M.dtype,
            device=M.device,
            _matmat=lambda X: M @ X,
            _rmatmat=lambda Y: M.mT @ Y,
            symmetric=symmetric,
            description="matrix",
        )

    if _looks_like_operator(A):
        own = _as_shape(A.shape, f"{type(A).__name__}.shape")  # type: ignore[attr-defined]
        if shape is not None and _as_shape(shape, "shape") != own:
            raise ShapeError(f"shape={tuple(shape)} disagrees with {type(A).__name__}.shape {own}")
        own_dtype, own_device = A.dtype, torch.device(A.device)  # type: ignore[attr-defined]
        if (dtype is not None and dtype != own_dtype) or (
            device is not None and device != own_device
        ):
            raise DTypeDeviceError(
                f"{type(A).__name__} is ({own_dtype}, {own_device}) but ({dtype}, {device}) was "
                "asked for; convert the operator itself"
            )
        _check_float(own_dtype, type(A).__name__)
        rmat = None
        if not symmetric and hasattr(type(A), "T"):
            # Looked up lazily: building a transpose node may be costly or fail for some nodes.
            def rmat(Y: torch.Tensor) -> torch.Tensor:
                return A.T @ Y  # type: ignore[attr-defined]

        return MatmatOperator(
            shape=own,
            dtype=own_dtype,
            device=own_device,
            _matmat=lambda X: A @ X,  # type: ignore[operator]
            _rmatmat=rmat,
            symmetric=symmetric,
            description=type(A).__name__,
        )

    if callable(A):
        if shape is None:
            raise ShapeError(
                "a plain callable operator needs its shape: as_matmat(f, shape=(m, n)) "
                "(the algorithms infer a square shape only from a given vector such as B or v0)"
            )
        dt = dtype or torch.get_default_dtype()
        _check_float(dt, "dtype")
        name = getattr(A, "__name__", type(A).__name__)
        return MatmatOperator(
            shape=_as_shape(shape, "shape"),
            dtype=dt,
            device=device or _default_device(),
            _matmat=A,
            symmetric=symmetric,
            description=f"callable {name!r}",
        )

    raise DTypeDeviceError(
        f"cannot use a {type(A).__name__} as a linear operator: pass a 2-D torch.Tensor, an "
        "object with .shape/.dtype/.device and @, or a callable f(X) with shape=(m, n)"
    )


def as_square_matmat(
    A: object,
    *,
    like: torch.Tensor | None = None,
    what: str = "this algorithm",
    symmetric: bool = False,
) -> MatmatOperator:
    """:func:`as_matmat` for algorithms that need a square ``A``.

    For a plain callable, the shape, dtype and device are taken from ``like`` (a right-hand side or
    start vector of shape (n,) or (n, k)) when it is given.
    """
    if (
        callable(A)
        and not isinstance(A, (torch.Tensor, MatmatOperator))
        and not (_looks_like_operator(A))
    ):
        if like is None:
            raise ShapeError(
                f"{what} got a plain callable without a shape; wrap it as "
                "as_matmat(f, shape=(n, n), dtype=..., device=...)"
            )
        n = like.shape[0]
        op = as_matmat(A, (n, n), like.dtype, like.device, symmetric=symmetric)
    else:
        op = as_matmat(A, symmetric=symmetric)
    if not op.is_square:
        raise ShapeError(
            f"{what} needs a square operator, got the {op.description} of shape {op.shape}"
        )
    return op


def check_symmetric_if_dense(A: object, what: str) -> None:
    """Raise NotSymmetricError for a dense tensor that is visibly not symmetric.

    Only tensors are checked: for operators known through products the test would cost matvecs,
    so symmetry is the caller's promise there.
    """
    if isinstance(A, torch.Tensor) and A.ndim == 2 and A.shape[0] == A.shape[1]:
        scale = A.abs().max()
        tol = torch.finfo(A.dtype).eps ** 0.5 * scale if A.dtype.is_floating_point else 0
        err = float((A - A.mT).abs().max())
        if err > tol:
            raise NotSymmetricError(
                f"{what} needs a symmetric matrix, but max|A - Aᵀ| = {err:.3g}; "
                "symmetrise it with (A + A.mT) / 2 if that is what is meant"
            )
