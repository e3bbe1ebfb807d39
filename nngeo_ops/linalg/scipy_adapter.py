"""Adapters to :class:`scipy.sparse.linalg.LinearOperator`.

They let scipy's iterative solvers (``eigsh`` including shift-invert, ``cg``, ``minres``,
``lobpcg``, ...) run on any operator :func:`as_matmat` understands. Arrays cross the boundary as
numpy on the CPU and are moved to the operator's device (and dtype) for every product, so the
adapter is meant for checks and moderate sizes, not for tight GPU loops.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from nngeo_ops.errors import DTypeDeviceError, ShapeError, SingularError, UnsupportedError

from ._matvec import MatmatOperator, as_matmat

__all__ = ["TorchLinearOperator", "to_scipy", "inverse_to_scipy"]


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError as exc:
        raise DTypeDeviceError(
            f"numpy has no equivalent of {dtype}; convert the operator to float32 or float64"
        ) from exc


class TorchLinearOperator(LinearOperator):
    """A scipy ``LinearOperator`` backed by a :class:`MatmatOperator`.

    ``dtype`` is the numpy twin of the torch dtype (float32 stays float32). Inputs are cast to
    that dtype; complex inputs (which some scipy routines pass to real operators) are applied to
    their real and imaginary parts separately. Products run under ``torch.no_grad()``.
    ``rmatvec``/``rmatmat``/``.H`` need a known transpose (tensor, ``.T``, ``symmetric=True``),
    else they raise :class:`UnsupportedError`.
    """

    def __init__(self, op: MatmatOperator):
        super().__init__(dtype=_numpy_dtype(op.dtype), shape=op.shape)
        self.op = op

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if np.iscomplexobj(X):
            return self._apply(fn, X.real) + 1j * self._apply(fn, X.imag)
        # A copy: scipy may hand over read-only or non-contiguous views.
        T = torch.from_numpy(np.array(X, dtype=self.dtype, copy=True, order="C"))
        with torch.no_grad():
            Y = fn(T.to(self.op.device))
        return Y.detach().cpu().numpy()

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply(self.op.matmat, X)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply(self.op.rmatmat, X)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._rmatmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _adjoint(self) -> LinearOperator:
        # Real operators: the adjoint is the transpose.
        return TorchLinearOperator(self.op.T)

    _transpose = _adjoint


def to_scipy(
    A: object,
    *,
    symmetric: bool = False,
    shape: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TorchLinearOperator:
    """Wrap ``A`` as a scipy ``LinearOperator``.

    ``matvec``/``matmat`` apply A; ``rmatvec``/``rmatmat`` apply Aᵀ, via the tensor's transpose,
    the object's ``.T``, or A itself when ``symmetric=True``. The scipy dtype is the numpy twin of
    the operator's torch dtype.

    Args:
        A: anything :func:`as_matmat` accepts; ``shape``/``dtype``/``device`` are passed on
            (required ``shape`` for a plain callable).
        symmetric: declare A = Aᵀ (gives ``rmatvec`` to callables and to objects without ``.T``).

    Returns:
        A :class:`TorchLinearOperator` usable with ``eigsh``, ``cg``, ``minres``, ``lobpcg``, ...
    """
    return TorchLinearOperator(as_matmat(A, shape, dtype, device, symmetric=symmetric))


def _lu_inverse(M: torch.Tensor, sigma: float) -> MatmatOperator:
    n = M.shape[0]
    shifted = M - sigma * torch.eye(n, dtype=M.dtype, device=M.device)
    LU, piv, info = torch.linalg.lu_factor_ex(shifted)
    if int(info) != 0:
        raise SingularError(
            f"A − σI is singular for σ = {sigma} (zero pivot {int(info)} in the LU "
            "factorisation); shift-invert needs σ that is not an eigenvalue"
        )
    return MatmatOperator(
        shape=(n, n),
        dtype=M.dtype,
        device=M.device,
        _matmat=lambda B: torch.linalg.lu_solve(LU, piv, B),
        _rmatmat=lambda B: torch.linalg.lu_solve(LU, piv, B, adjoint=True),
        description=f"LU inverse of (A − {sigma}·I)",
    )


def _takes_regul(fn: Callable) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "regul" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def inverse_to_scipy(
    A: object,
    sigma: float = 0.0,
    solve: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    symmetric: bool = False,
) -> TorchLinearOperator:
    """A scipy ``LinearOperator`` applying (A − σI)⁻¹, e.g. for shift-invert ``eigsh``.

    The solve is taken, in this order, from

    1. ``solve``: a callable mapping an (n, k) tensor B to (A − σI)⁻¹ B (it must include the
       shift itself);
    2. for σ ≠ 0, ``A.to_scipy_inverse(σ)`` when the object has it (the lazy operators of
       ``nngeo_ops.ops``, whose ``solve`` takes no ``regul=``: they solve with the node A − σI);
    3. ``A.solve``: the object's solve, called as ``A.solve(B)`` for σ = 0 and
       ``A.solve(B, regul=-σ)`` otherwise (the library convention of representations:
       ``solve(v, regul=λ)`` solves with A + λI; a ``solve`` without ``regul=`` is refused);
    4. a dense LU factorisation of A − σI, computed once, when A is a tensor.

    Use as ``eigsh(to_scipy(A), k, sigma=σ, OPinv=inverse_to_scipy(A, σ))``; eigsh then returns
    the k eigenvalues nearest σ.

    Args:
        A: the operator (n, n): a tensor or an operator object (it gives the shape, dtype and
            device; with ``solve=`` it is not applied).
        sigma: the shift σ.
        solve: see above.
        symmetric: declare (A − σI)⁻¹ symmetric, giving ``rmatvec`` to cases 1 and 2 (the LU
            path always has it).

    Raises:
        SingularError: the LU path meets an exactly singular A − σI.
        UnsupportedError: no solve is available (not a tensor, no ``.solve``, no ``solve=``).
    """
    sigma = float(sigma)
    if solve is not None:
        if isinstance(A, torch.Tensor) or hasattr(A, "shape"):
            op = as_matmat(A)
            shape, dt, dev = op.shape, op.dtype, op.device
        else:
            raise ShapeError(
                "inverse_to_scipy: with solve= pass A as a tensor or operator object so that the "
                "shape, dtype and device are known"
            )
        inv = as_matmat(solve, shape=shape, dtype=dt, device=dev, symmetric=symmetric)
    elif isinstance(A, torch.Tensor):
        op = as_matmat(A)
        if not op.is_square:
            raise ShapeError(f"inverse_to_scipy needs a square matrix, got shape {op.shape}")
        inv = _lu_inverse(A, sigma)
    elif sigma != 0.0 and hasattr(A, "to_scipy_inverse"):
        # lazy operators shift themselves (A − σI) and solve that; their solve takes no regul=
        return A.to_scipy_inverse(sigma)
    elif sigma != 0.0 and hasattr(A, "solve") and not _takes_regul(A.solve):
        raise UnsupportedError(
            f"inverse_to_scipy: {type(A).__name__}.solve takes no regul= argument, so the shift "
            "σ cannot be applied; pass solve=callable applying (A − σI)⁻¹, or sigma=0"
        )
    elif hasattr(A, "solve") and hasattr(A, "shape"):
        op = as_matmat(A)
        node = A

        def apply(B: torch.Tensor) -> torch.Tensor:
            return node.solve(B) if sigma == 0.0 else node.solve(B, regul=-sigma)  # type: ignore[attr-defined]

        inv = as_matmat(
            apply, shape=op.shape, dtype=op.dtype, device=op.device, symmetric=symmetric
        )
    else:
        raise UnsupportedError(
            f"inverse_to_scipy: {type(A).__name__} has no .solve and is not a tensor; pass "
            "solve=callable applying (A − σI)⁻¹ to an (n, k) tensor"
        )
    if inv.shape[0] != inv.shape[1]:
        raise ShapeError(f"inverse_to_scipy needs a square operator, got shape {inv.shape}")
    return TorchLinearOperator(inv)
