"""``Diagonal(d)`` and the scaled identity ``c·I``."""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ArgumentTypeError, InvalidArgumentError, NonFiniteError
from .base import LinearOperator, Scalar, fmt_scalar, is_scalar, scalar_float
from .leaf_checks import KnownRange, _checksum, finite_range


class Diagonal(LinearOperator):
    """``diag(d)`` for a vector ``d`` of length ``n``; tagged PSD when every ``d_i ≥ 0``.

    The node keeps the range ``(min d, max d)`` it had when built (one reduction, which also proves
    every entry finite), keyed like a fingerprint by the identity, version counter and checksum of
    ``d``: while ``d`` is unchanged it says whether 0 is an entry (:attr:`excludes_zero`) and gives
    the range of the damped ``d + c`` without a pass over it (:meth:`shifted`).

    ``derived=True`` marks a ``d`` that ops computed itself from checked leaves (a rewrite's fold),
    which no caller holds: its range is then keyed on its version counter alone (no checksum).

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
        self._range = KnownRange(d, lo, hi, derived)

    def known_range(self, checksum: Callable[[torch.Tensor], Any] = _checksum) -> tuple | None:
        """``(min d, max d)`` as computed when the node was built, or None when ``d`` may have changed
        since (another tensor, an in-place operation, a ``.data`` write seen by the checksum).
        ``checksum(d)``: :func:`~nngeo_ops.ops.leaf_checks._checksum` of ``d`` (a compilation passes the
        one its cache key holds, :meth:`Compiled.checksum <nngeo_ops.ops.Compiled.checksum>`)."""
        r = self.__dict__.get("_range")
        return None if r is None or not r.valid(self.d, checksum) else (r.lo, r.hi)

    @property
    def excludes_zero(self) -> bool:
        """No entry of ``d`` is 0, known from the range computed when the node was built (and
        ``d`` unchanged since); False means unknown, not singular."""
        r = self.__dict__.get("_range")
        return r is not None and r.excludes_zero(self.d)

    def shifted(self, c: Scalar, checksum: Callable[[torch.Tensor], Any] = _checksum) -> Diagonal:
        """``diag(d + c)`` for a scalar ``c`` (a number or a 0-dim tensor): a ``derived`` node named
        ``"diag"`` over the fresh tensor ``d + c``, whose range comes without a pass over it.

        Exact: ``x ↦ fl(x + c)`` is non-decreasing (rounding to nearest is monotone, and so are
        flush-to-zero modes), so ``min(d + c) = fl(min d + c)`` and ``max(d + c) = fl(max d + c)``,
        computed with the entries' own rounding (:func:`_shift_ends`) from the range of ``d``
        known since the node was built (:meth:`known_range`). ``d`` is finite (its range is), so
        ``d + c`` has a NaN or an infinity only if an end has one (an overflow happens first at an
        end; a non-finite ``c`` makes both ends non-finite): the node then reduces ``d + c`` itself
        and raises :class:`~nngeo_ops.errors.NonFiniteError` as any ``Diagonal`` does; without a
        valid known range (``d`` changed since the build, empty, complex) it reduces as well.
        """
        d = self.d
        e = d + c
        r = self.known_range(checksum)
        # lo ≤ hi fails for an empty d (inf, -inf) and a complex one (nan, nan): no range to map
        ends = _shift_ends(c, r, d, e.dtype) if r is not None and r[0] <= r[1] else None
        return Diagonal(e, derived=True, value_range=ends)

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
        if type(device) is not torch.device:
            device = torch.device(device) if device is not None else torch.get_default_device()
        # exact types first: the ABC checks cost ~10 µs each run cold (a first damped solve)
        exact = type(n) is int
        if (not exact and (isinstance(n, bool) or not isinstance(n, numbers.Integral))) or n < 0:
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


_F32_TINY = torch.finfo(torch.float32).tiny
_F64_TINY = torch.finfo(torch.float64).tiny


_FLOAT32 = struct.Struct("f")


def _round32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), as a Python float; OverflowError beyond
    the float32 range."""
    return _FLOAT32.unpack(_FLOAT32.pack(x))[0]


def _normal(values: tuple, tiny: float) -> bool:
    """Every value is 0 or a finite normal number (of the precision whose ``tiny`` is given)."""
    for v in values:
        if v != 0 and not tiny <= abs(v) < math.inf:  # NaN fails the comparison
            return False
    return True


def _shift_ends(c: Scalar, r: tuple, d: torch.Tensor, dtype: torch.dtype) -> tuple | None:
    """``(fl(lo + c), fl(hi + c))`` as torch computes ``d + c`` entry by entry (``r = (lo, hi)``,
    two entries of ``d``; ``dtype`` that of ``d + c``), or None when an end is not finite.

    A Python-float ``c`` on a CPU float64 or float32 ``d``: in Python, without a torch call (torch
    computes ``fl(x + fl(c))`` in the tensor's precision, ``fl`` rounding to nearest; for float32
    the exact sum of two float32 numbers rounded first to float64, then to float32, is the
    correctly rounded float32 sum, as float64 carries more than 2·24 + 1 bits), while every
    operand and result is 0 or a normal number (so that no flush-to-zero mode can make the two
    computations differ). Otherwise the two ends go through the same torch operation as the
    entries (a two-entry tensor of ``d``'s dtype and device).
    """
    lo, hi = r
    if type(c) is float and dtype is d.dtype and d.is_cpu:
        try:
            if dtype is torch.float64:
                out = (lo + c, hi + c)
                if _normal((lo, hi, c, *out), _F64_TINY):
                    return out
            elif dtype is torch.float32:
                c32 = _round32(c)
                out = (_round32(lo + c32), _round32(hi + c32))
                if _normal((lo, hi, c32, *out), _F32_TINY):
                    return out
        except OverflowError:  # beyond float32: the node's own pass names it
            return None
    with torch.no_grad():
        ends = torch.tensor(r, dtype=d.dtype, device=d.device) + c
        if ends.dtype != dtype:
            return None
        a, b = ends.detach().tolist()
    return (a, b) if math.isfinite(a) and math.isfinite(b) else None


def Identity(n: int, dtype: torch.dtype | None = None, device: Any = None) -> ScaledIdentity:
    """The ``n × n`` identity; without ``dtype`` it adopts the dtype of what it is combined with."""
    return ScaledIdentity(1.0, n, dtype, device)
