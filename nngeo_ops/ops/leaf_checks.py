"""Checks and fingerprints of the tensors a node holds (its leaves), shared by every node kind.

- :func:`_checksum`: the sampled checksum that, with a tensor's identity and version counter, keys
  a node's cached compilation (:meth:`~nngeo_ops.ops.LinearOperator.fingerprint`) and the ranges
  that nodes remember (a ``.data`` write bumps no version counter);
- :func:`value_range` / :func:`finite_range` / :func:`check_finite`: one reduction that proves a
  leaf finite and gives its range; :class:`KnownRange`: that range remembered while the leaf is
  unchanged (whether 0 is an entry, the range of a damped diagonal);
- :func:`check_symmetric_tag`: a user's ``symmetric=True`` verified to a tolerance (and whether the
  matrix is bitwise symmetric);
- :func:`records_grad` and :func:`_may_overlap`: when a product may write into a caller's ``out``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import NonFiniteError, NotSymmetricError

_RAMPS: dict[tuple, torch.Tensor] = {}
_SAMPLES: dict[tuple, tuple] = {}


CHECKSUM_ENTRIES = 1 << 16  # leaves up to this size are checksummed whole, larger ones sampled
CHECKSUM_BLOCK = 64  # a larger leaf is sampled in contiguous blocks of this many entries
CHECKSUM_ROWS = 64  # ... and this many blocks, spread evenly from its first to its last entry


def _ramp(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    w = _RAMPS.get(key)
    if w is None:
        if len(_RAMPS) > 64:
            _RAMPS.clear()
        w = _RAMPS[key] = torch.linspace(1.0, 2.0, n, dtype=dtype, device=device)
    return w


def _sampling(n: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, torch.Tensor]:
    """``(step, b, W)`` of the sample of a leaf of ``n > CHECKSUM_ENTRIES`` entries: blocks of ``b``
    entries every ``step``, and their weights ``W`` as a ``(CHECKSUM_ROWS, b)`` view of the ramp
    (see :func:`_checksum`); kept per (n, dtype, device), as the ramp is."""
    key = (n, dtype, device)
    hit = _SAMPLES.get(key)
    if hit is None:
        rows = CHECKSUM_ROWS
        step = (n - CHECKSUM_BLOCK) // (rows - 1)
        # blocks of b ∈ [64, 126] entries so that the first starts at entry 0 and the last ends at
        # entry n − 1 (a tail past the last whole block is otherwise unseen)
        b = n - (rows - 1) * step
        if len(_SAMPLES) > 64:
            _SAMPLES.clear()
        hit = _SAMPLES[key] = (step, b, _ramp(rows * b, dtype, device).view(rows, b))
    return hit


def _checksum(t: torch.Tensor) -> float | None:
    """``Σ wᵢ tᵢ`` with fixed weights ``wᵢ`` in [1, 2] over every entry of a leaf of at most
    :data:`CHECKSUM_ENTRIES` entries, over a sample of a larger one (a whole pass would cost as
    much as a cached diagonal solve).

    The sample is :data:`CHECKSUM_ROWS` evenly spaced contiguous blocks of
    :data:`CHECKSUM_BLOCK` to 2·:data:`CHECKSUM_BLOCK` − 2 entries, the first starting at entry 0
    and the last ending at the last entry: one strided view ``(rows, block)`` of the leaf, weighted
    in one product and one sum. It runs at
    every cached call, right after the caller's own work has evicted the leaf and the interpreter's
    code from the caches, where each further torch call costs ~10 µs: three calls take ~90 µs
    after a forward+backward of the benchmark MLP, the former 65 536-entry sample in eleven calls
    ~230 µs (8 against 28 µs when warm). For the same reason the Python around them is kept to a
    minimum: no grad-mode switch (a leaf that requires grad is detached, nothing else records a
    graph), the sample's shape and weights looked up once per size.
    """
    if not t.is_floating_point():
        return None
    n = t.numel()
    if n == 0:
        return None
    if t.requires_grad:
        t = t.detach()
    if n <= CHECKSUM_ENTRIES:
        d = t.reshape(-1)
        return float(d @ _ramp(n, d.dtype, d.device))
    d = t if t.is_contiguous() else t.reshape(-1)  # as_strided reads the storage directly
    step, b, w = _sampling(n, d.dtype, d.device)
    sample = d.as_strided((CHECKSUM_ROWS, b), (step, 1), d.storage_offset())
    return float((sample * w).sum())


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    # byte ranges spanned by the two views intersect (conservative for interleaved strides)
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
        return start, start + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operation on these tensors (grad mode on and one requires grad).

    The ``out=`` variants of torch's products refuse such operands, so a node's
    :meth:`LinearOperator._matmat_into` computes and copies instead where this holds (``out``
    included: a buffer that an earlier differentiable copy made part of the graph).
    """
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not a generator: node.compiled() runs this cold at every solve
        if t is not None and t.requires_grad:
            return True
    return False


def check_finite(t: torch.Tensor, what: str) -> None:
    """The one finiteness check of leaf tensors: raise NonFiniteError naming the leaf and the fix."""
    finite_range(t, what)


def value_range(t: torch.Tensor) -> tuple[float, float, bool]:
    """``(min t, max t, every entry finite)`` with the extremes as Python floats; ``(inf, -inf, True)``
    when ``t`` is empty.

    For a real floating tensor this is one reduction (``torch.aminmax``, which propagates NaN, so a
    finite minimum and maximum prove every entry finite) and one synchronisation, where
    ``isfinite(t).all()`` followed by sign checks such as ``(t >= 0).all()`` would be several passes
    with a boolean temporary each: ~10× the time on a 2·10⁵-entry diagonal, which dominated the
    first damped solve of a diagonal Fisher. Complex tensors use ``isfinite`` (their range is
    undefined and returned as ``(nan, nan)``).
    """
    if t.numel() == 0:
        return math.inf, -math.inf, True
    with torch.no_grad():
        d = t.detach()
        if d.is_complex():
            return math.nan, math.nan, bool(torch.isfinite(d).all())
        if d.dtype is torch.bool:
            d = d.to(torch.uint8)
        lo, hi = torch.aminmax(d)
        # on CPU two reads cost less than stacking them; elsewhere one synchronisation for both
        lo, hi = (lo.item(), hi.item()) if d.is_cpu else torch.stack((lo, hi)).tolist()
    return float(lo), float(hi), math.isfinite(lo) and math.isfinite(hi)


def finite_range(t: torch.Tensor, what: str) -> tuple[float, float]:
    """``(min t, max t)`` of :func:`value_range`, raising :class:`~nngeo_ops.errors.NonFiniteError`
    (as :func:`check_finite`) when ``t`` has a NaN or an infinite entry; ``(inf, -inf)`` when empty.
    """
    lo, hi, ok = value_range(t)
    if not ok:
        raise NonFiniteError(
            f"{what} contains NaN or inf entries; clean the input (torch.nan_to_num, or find where "
            "the statistics overflowed) before building the operator"
        )
    return lo, hi


class KnownRange:
    """The range ``(lo, hi)`` of a vector of entries (a diagonal, a spectrum) that
    :func:`finite_range` computed when its node was built, and the key that says whether it still
    holds: ``(id, version, checksum)`` of the tensor as in
    :meth:`LinearOperator.fingerprint`, so that an in-place change or a ``.data`` write is seen
    and the caller checks again.

    ``derived=True``: ``t`` was computed by ops itself from leaves it already checked (the folded
    ``d + c`` of a damped diagonal) and is held by the rewritten tree only, so no caller writes to
    it through ``.data``; the version counter alone keys it (no checksum). ``keyed=False``: the
    range will never be asked for (a node that only wants to know whether 0 is excluded, when the
    range holds 0): no key is taken and :meth:`valid` is False.
    """

    __slots__ = ("lo", "hi", "key", "derived")

    def __init__(
        self, t: torch.Tensor, lo: float, hi: float, derived: bool = False, keyed: bool = True
    ) -> None:
        self.lo, self.hi, self.derived = lo, hi, derived
        self.key = (id(t), t._version, None if derived else _checksum(t)) if keyed else None

    def valid(self, t: torch.Tensor, checksum: Callable[[torch.Tensor], Any] = _checksum) -> bool:
        """Whether ``t`` is the tensor the range was taken of, unchanged since (``checksum``: how
        to checksum it, e.g. read from a compilation's fingerprint)."""
        key = self.key
        if key is None or key[0] != id(t) or key[1] != t._version:
            return False
        return self.derived or key[2] == checksum(t)

    def excludes_zero(self, t: torch.Tensor) -> bool:
        """True when ``t`` is known to have no zero entry (False: unknown, check it)."""
        return (self.lo > 0 or self.hi < 0) and self.valid(t)


_SYMMETRY_CHUNK = 1 << 22  # entries of M − Mᵀ formed at a time by check_symmetric_tag


def check_symmetric_tag(M: torch.Tensor, what: str) -> float:
    """Verify a user's ``symmetric=True`` / ``psd=True`` tag on a dense matrix, to a tolerance:
    ``max|M − Mᵀ| ≤ √eps · max|M|`` (O(n²)); returns ``max|M − Mᵀ|`` (0.0: bitwise symmetric).

    The difference is formed a block of rows at a time, over the upper triangle only (at most
    :data:`_SYMMETRY_CHUNK` entries): whole, ``(M − Mᵀ).abs()`` held two temporaries of M's size,
    3.2 GB next to a 20 490² float32 Fisher block.
    """
    with torch.no_grad():
        if not M.numel():
            return 0.0
        lo, hi = torch.aminmax(M)
        scale = max(abs(float(lo)), abs(float(hi)))
        n = M.shape[0]
        rows = max(1, _SYMMETRY_CHUNK // n)
        err = 0.0
        for i in range(0, n, rows):
            j = min(n, i + rows)
            err = max(err, float((M[i:j, i:] - M[i:, i:j].mT).abs().max()))
    tol = torch.finfo(M.dtype).eps ** 0.5 * scale
    if err > tol:
        raise NotSymmetricError(
            f"{what} was tagged symmetric (symmetric=True or psd=True) but max|M − Mᵀ| = "
            f"{err:.3g} (max|M| = {scale:.3g}); pass (M + M.mT) / 2 if the asymmetry is round-off, "
            "or drop the tag"
        )
    return err
