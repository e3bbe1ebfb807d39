"""The product of an exactly symmetric matrix with one vector, reading one triangle (BLAS ``symv``).

For ``M = Mᵀ`` (bitwise), ``y = M x`` needs only the upper (or lower) triangle of ``M``: BLAS
``?symv`` reads each off-diagonal entry once and uses it for both ``y_i += M_ij x_j`` and
``y_j += M_ij x_i``. A matrix-vector product is bound by memory traffic, so reading half the matrix
is up to twice as fast as a general ``gemv``; on CPU, against torch's ``M @ x`` (MKL ``gemv``), it
measured 0.64–0.67 × for a float32 matrix of 20 490² (1.6 GB), 0.5–0.65 × from 512² to 8192² in
float32 and float64 (``benchmarks/README.md``). The result is ``M x`` up to the order of its sums
(rounding only), and only when ``M`` is exactly symmetric: a matrix symmetric to a tolerance would
give ``triu(M) + triu(M, 1)ᵀ`` times ``x`` instead, which is why callers pass a matrix they know to
be bitwise symmetric (:class:`nngeo_ops.ops.Dense` records that when it is built).

torch has no ``symv``; scipy's BLAS wrappers (scipy is a dependency) run it on the tensors' memory
without copies: a row-major ``M`` is the column-major ``Mᵀ = M`` that Fortran BLAS expects. scipy's
OpenBLAS keeps its own thread pool; :func:`symv` runs it with torch's thread count
(``torch.get_num_threads()``) through ``threadpoolctl`` and restores the pool's count after the call.

The route is taken by :func:`symv_applies` only where it is exact and faster: CPU tensors of
float32 or float64, ``M`` square and contiguous in either order (no copy), at least :data:`SYMV_MIN_SIZE`
rows, and no autograd recording (the product has no derivative formula here).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch

__all__ = ["SYMV_MIN_SIZE", "symv", "symv_applies"]

#: Below this size torch's own ``gemv`` is used: the wrapper's fixed cost (~3 µs) is then a
#: noticeable share of a product of a few µs. ``symv`` was faster from 256 rows on, 0.6–0.65 × at 512.
SYMV_MIN_SIZE = 512

_DTYPES = (torch.float32, torch.float64)
_LOCK = threading.Lock()


def symv_applies(M: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`symv` can compute ``M @ x`` for this square ``M`` (the caller knows ``M = Mᵀ``
    exactly) and vector ``x`` of shape ``(n,)`` or ``(n, 1)``."""
    n = M.shape[0]
    return (
        n >= SYMV_MIN_SIZE
        and M.device.type == "cpu"
        and x.device.type == "cpu"
        and M.dtype in _DTYPES
        and x.dtype == M.dtype
        and x.numel() == n
        and (M.is_contiguous() or M.mT.is_contiguous())
        and not M.is_conj()
        and not M.is_neg()
        and not (torch.is_grad_enabled() and (M.requires_grad or x.requires_grad))
        and type(M) is torch.Tensor
        and type(x) is torch.Tensor
    )


def symv(M: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = M x`` for an exactly symmetric ``(n, n)`` ``M``, reading one triangle of ``M``.

    Args:
        M: ``(n, n)``, bitwise symmetric, contiguous row- or column-major (:func:`symv_applies`
            holds).
        x: ``(n,)`` or ``(n, 1)``; the result has the same shape.
        out: optional contiguous tensor of ``x``'s shape, dtype and device to write ``y`` into.

    Returns:
        ``y`` (``out`` when given).
    """
    shape = x.shape
    xv = x.detach().reshape(-1).contiguous().numpy()
    # a row-major M is the Fortran (column-major) array Mᵀ; Mᵀ = M, and its lower triangle is M's
    # upper one, which is read contiguously row by row
    if M.is_contiguous():
        A, lower = M.detach().numpy().T, 1
    else:
        A, lower = M.detach().numpy(), 0
    # y zeroed although beta = 0: some BLAS builds scale y by beta, and 0·NaN of stale memory is NaN
    out = torch.zeros(shape, dtype=M.dtype) if out is None else out.zero_()
    y = out.detach().view(-1).numpy()
    fn = _blas(M.dtype)
    with _threads(torch.get_num_threads()):
        r = fn(1.0, A, xv, beta=0.0, y=y, overwrite_y=1, lower=lower)
    if r.ctypes.data != y.ctypes.data:  # f2py copied (never for a contiguous y of this dtype)
        out.view(-1).copy_(torch.from_numpy(r))
    return out


def _blas(dtype: torch.dtype) -> Any:
    from scipy.linalg import blas

    return blas.ssymv if dtype == torch.float32 else blas.dsymv


@functools.cache
def _pools() -> tuple:
    """The thread-pool controllers of scipy's BLAS (empty without threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return ()
    import scipy.linalg.blas  # noqa: F401  (loads scipy's BLAS before the controller looks)

    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    # a wheel's scipy bundles its own OpenBLAS (under scipy.libs, beside numpy's); elsewhere (conda,
    # system BLAS) the pools are shared and all are set
    own = tuple(c for c in libs if "scipy.libs" in str(getattr(c, "filepath", "")))
    return own or tuple(libs)


class _threads:
    """Run scipy's BLAS with ``n`` threads, restoring each pool's own count afterwards. The lock
    keeps two Python threads from interleaving their changes of the shared pools."""

    def __init__(self, n: int) -> None:
        self.n, self.saved = n, []

    def __enter__(self) -> None:
        _LOCK.acquire()
        for c in _pools():
            k = c.get_num_threads()
            if k is not None and k != self.n:
                c.set_num_threads(self.n)
                self.saved.append((c, k))

    def __exit__(self, *exc: object) -> None:
        try:
            for c, k in self.saved:
                c.set_num_threads(k)
        finally:
            _LOCK.release()
