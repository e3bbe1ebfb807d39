"""``MatFree``: a matrix known only through a function that applies it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ShapeError
from .base import LinearOperator


class MatFree(LinearOperator):
    """A matrix given by ``matvec`` (and optionally ``rmatvec`` for ``Aᵀ``).

    Args:
        matvec: applies the matrix. With ``batched=False`` (default) it takes a vector ``(n,)`` and is
            called once per column; with ``batched=True`` it takes a block ``(n, k)`` and returns
            ``(m, k)``, which is how Jacobian products should be supplied.
        shape: ``(m, n)``.
        dtype, device: of the vectors it takes and returns.
        rmatvec: applies ``Aᵀ`` (same calling convention); not needed when ``symmetric``.
        symmetric, psd: tags, trusted.
        name: how the node prints (e.g. ``Jᵀ·H·J``).

    The function's state is not tracked: if it changes, build a new node.
    """

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype | None = None,
        device: Any = None,
        *,
        rmatvec: Callable[[torch.Tensor], torch.Tensor] | None = None,
        symmetric: bool = False,
        psd: bool = False,
        batched: bool = False,
        name: str = "MatFree",
    ) -> None:
        super().__init__(
            shape,
            dtype or torch.get_default_dtype(),
            device if device is not None else torch.get_default_device(),
            symmetric=symmetric,
            psd=psd,
        )
        self.fn, self.rfn, self.batched, self.name = matvec, rmatvec, batched, name

    def _rebuild(self, **fields: Any) -> MatFree:
        return self

    def _to(self, dtype: torch.dtype | None = None, device: Any = None) -> MatFree:
        """Wraps the functions so that they see their original dtype/device."""
        src_dt, src_dev = self.dtype, self.device
        dst_dt, dst_dev = dtype or src_dt, torch.device(device) if device is not None else src_dev

        def wrap(f: Callable | None) -> Callable | None:
            if f is None:
                return None
            return lambda x: f(x.to(device=src_dev, dtype=src_dt)).to(device=dst_dev, dtype=dst_dt)

        return MatFree(
            wrap(self.fn),
            self.shape,
            dst_dt,
            dst_dev,
            rmatvec=wrap(self.rfn),
            symmetric=self.symmetric,
            psd=self.psd,
            batched=self.batched,
            name=self.name,
        )

    def _apply(self, f: Callable, X: torch.Tensor, rows: int) -> torch.Tensor:
        Y = f(X) if self.batched else torch.stack([f(x) for x in X.unbind(1)], dim=1)
        if Y.shape != (rows, X.shape[1]):
            raise ShapeError(
                f"{self.name}: the supplied function returned shape {tuple(Y.shape)}, expected "
                f"{(rows, X.shape[1])}"
            )
        return Y

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._apply(self.fn, X, self.shape[0])

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return self._matmat(X)
        if self.rfn is None:
            raise NotImplementedError(
                f"{self.name}: Aᵀ products need rmatvec=...; pass it or symmetric=True"
            )
        return self._apply(self.rfn, X, self.shape[1])

    def _str(self) -> str:
        return self.name
