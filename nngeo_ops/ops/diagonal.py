"""``Diagonal(d)`` and the scaled identity ``c·I``."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..errors import ArgumentTypeError, InvalidArgumentError, NonFiniteError
from .base import (
    LinearOperator,
    Scalar,
    ZeroFree,
    finite_range,
    fmt_scalar,
    is_scalar,
    scalar_float,
)


class Diagonal(LinearOperator):
    """``diag(d)`` for a vector ``d`` of length ``n``; tagged PSD when every ``d_i ≥ 0``.

    ``derived=True`` marks a ``d`` that ops computed itself from checked leaves (a rewrite's fold),
    which no caller holds: whether it has a zero is then keyed on its version counter alone (see
    :class:`~nngeo_ops.ops.base.ZeroFree`).

    ``value_range=(lo, hi)``: ``(min d, max d)``, both finite, as :func:`~nngeo_ops.ops.value_range`
    computed them on ``d`` as it is now (a caller that checked ``d`` by that reduction already: the
    statistics engine's diagonal), in place of the node's own reduction.
    """

    _tensor_fields = ("d",)

    def __init__(
        self,
        d: torch.Tensor,
        *,
        name: str = "diag",
        derived: bool = False,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        if not isinstance(d, torch.Tensor) or d.dim() != 1:
            raise ArgumentTypeError(
                f"Diagonal expects a 1-D tensor, got {getattr(d, 'shape', type(d))}"
            )
        if value_range is None:
            # one reduction gives finiteness, the PSD tag and whether 0 can be an entry
            lo, hi = finite_range(d, f"Diagonal {name}")
        else:
            lo, hi = value_range
        super().__init__((d.shape[0], d.shape[0]), d.dtype, d.device, symmetric=True, psd=lo >= 0)
        self.d = d
        self.name = name
        self._zero_free = ZeroFree(d, lo, hi, derived)

    @property
    def excludes_zero(self) -> bool:
        """No entry of ``d`` is 0, known from the range computed when the node was built (and
        ``d`` unchanged since); False means unknown, not singular."""
        zf = self.__dict__.get("_zero_free")
        return zf is not None and zf.known(self.d)

    def _rebuild(self, **fields: Any) -> Diagonal:
        return Diagonal(fields.get("d", self.d), name=self.name)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.d.unsqueeze(1) * X

    def _mv(self, x: torch.Tensor) -> torch.Tensor:
        return self.d * x

    def to_dense(self) -> torch.Tensor:
        return torch.diag(self.d)

    def _str(self) -> str:
        return self.name


class ScaledIdentity(LinearOperator):
    """``c·I_n``. ``c`` may be a 0-dim tensor, so that gradients flow to a damping parameter.

    Built without a dtype, the node is *flexible*: combined with another node it adopts that node's
    dtype and device (so ``F + 1e-3 * Identity(n)`` works for a float32 or float64 ``F``).
    """

    _tensor_fields = ("c",)

    def __init__(
        self, c: Scalar, n: int, dtype: torch.dtype | None = None, device: Any = None
    ) -> None:
        self.flexible = dtype is None and not isinstance(c, torch.Tensor)
        if isinstance(c, torch.Tensor):
            dtype = dtype or c.dtype
            device = device if device is not None else c.device
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.get_default_device()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise InvalidArgumentError(
                f"Identity / ScaledIdentity: the size must be a non-negative int, got {n!r}; pass "
                "the number of rows, e.g. Identity(A.shape[0])"
            )
        if not is_scalar(c):
            raise ArgumentTypeError(
                f"ScaledIdentity: c must be a number or a 0-dim tensor, got {type(c).__name__}; "
                "for a vector of diagonal entries use Diagonal(d)"
            )
        cf = scalar_float(c)
        if not math.isfinite(cf):
            raise NonFiniteError(
                f"ScaledIdentity: c = {cf} is not finite; pass a finite scale (a damping, a prior "
                "precision)"
            )
        super().__init__((n, n), dtype, device, symmetric=True, psd=cf >= 0, orthogonal=cf == 1)
        self.c = c.to(dtype=dtype, device=device) if isinstance(c, torch.Tensor) else c
        self.n = int(n)

    def _to(self, dtype: torch.dtype | None = None, device: Any = None) -> ScaledIdentity:
        c = self.c.to(dtype=dtype, device=device) if isinstance(self.c, torch.Tensor) else self.c
        out = ScaledIdentity(c, self.n, dtype or self.dtype, device or self.device)
        out.flexible = self.flexible
        return out

    def __mul__(self, c: Any) -> LinearOperator:
        if not is_scalar(c):
            return NotImplemented
        out = ScaledIdentity(c * self.c, self.n, None if self.flexible else self.dtype, self.device)
        if not self.flexible:
            out.flexible = False
        return out

    __rmul__ = __mul__

    def _rebuild(self, **fields: Any) -> ScaledIdentity:
        out = ScaledIdentity(fields.get("c", self.c), self.n, self.dtype, self.device)
        out.flexible = self.flexible
        return out

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return X if self.is_identity else self.c * X

    _mv = _matmat

    @property
    def is_identity(self) -> bool:
        """Whether ``c`` is the Python number 1 (a tensor ``c`` never counts as the identity)."""
        return not isinstance(self.c, torch.Tensor) and self.c == 1

    def to_dense(self) -> torch.Tensor:
        return self.c * torch.eye(self.n, dtype=self.dtype, device=self.device)

    def diag_vector(self) -> torch.Tensor:
        """The diagonal ``c·1`` of shape ``(n,)``."""
        return self.c * torch.ones(self.n, dtype=self.dtype, device=self.device)

    def _str(self) -> str:
        return "I" if self.is_identity else f"{fmt_scalar(self.c)}·I"


def Identity(n: int, dtype: torch.dtype | None = None, device: Any = None) -> ScaledIdentity:
    """The ``n × n`` identity; without ``dtype`` it adopts the dtype of what it is combined with."""
    return ScaledIdentity(1.0, n, dtype, device)
