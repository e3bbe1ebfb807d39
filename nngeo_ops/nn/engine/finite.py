"""Non-finite statistics, caught where they are produced and named by layer.

A model whose outputs are finite can still have non-finite derivatives: ``x.abs().sqrt()`` at 0, a
saturated ``log``, an overflow in float16. The statistics gathered from them (Fisher blocks, KFAC
factors, implicit products) then hold NaN or inf, and every later solve, trace or product would
return NaN without a word. The checks here run once per statistic, on the accumulated values (not
per batch, not per use), and raise :class:`~nngeo_ops.errors.NonFiniteError` naming the layers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from ...errors import ArgumentTypeError, NonFiniteError
from ...ops import value_range
from ..params import LayerCollection

_FIX = (
    "the model's outputs are finite but its derivatives are not (e.g. x.abs().sqrt() or log at 0, an "
    "overflow in low precision); make the activation differentiable there (add a small epsilon), "
    "or leave these layers out with a LayerCollection"
)


def all_finite(t) -> bool:
    """Whether every entry of ``t`` is finite.

    A finite sum proves it: an inf or NaN entry makes any sum inf or NaN, never finite (IEEE
    arithmetic, whatever the order of the reduction). ``sum`` is the cheapest reduction torch has
    (half the time of ``aminmax`` on a 2·10⁵-entry float32 diagonal, a third with its
    synchronisation); only a sum that overflowed, or a tensor that is not finite, takes the exact
    range (one reduction, not a boolean copy of ``t``).
    """
    if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() == 0:
        return True
    if t.requires_grad:  # (else the sum as it is: no grad mode to switch, no detached alias)
        t = t.detach()
    if math.isfinite(float(t.sum())):
        return True
    return value_range(t)[2]


def _all_finite(value) -> bool:
    if isinstance(value, Mapping):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_all_finite(v) for v in value)
    return all_finite(value)


def layers_of_rows(bad_rows: torch.Tensor, lc: LayerCollection) -> list[str]:
    """The layers owning the given flat parameter indices (rows of a (P, ...) statistic)."""
    rows = set(bad_rows.tolist())
    return [
        lid for lid, sl in lc.layer_slices().items() if any(sl.start <= r < sl.stop for r in rows)
    ]


def nonfinite_layers(value, lc: LayerCollection) -> list[str] | None:
    """The layers of ``value`` holding NaN / inf ([] when it is finite; None when it is not finite
    but its layout does not say which layer). ``value`` is a per-layer dict (any nesting below the
    layer ids), or a tensor whose first dimension is the flat parameter index."""
    if isinstance(value, Mapping) and set(value) <= set(lc.layers):
        return [lid for lid, v in value.items() if not _all_finite(v)]
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == lc.numel():
        if all_finite(value):
            return []
        if value.dim() == 2 and value.shape[1] == value.shape[0]:
            # a (P, P) matrix: a NaN gradient of one layer spreads to the rows of every layer it is
            # coupled with, but to the diagonal of its own layer only
            bad = ~torch.isfinite(value.diagonal())
            if bad.any():
                return layers_of_rows(bad.nonzero().reshape(-1), lc)
        bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(1)
        return layers_of_rows(bad.nonzero().reshape(-1), lc)
    return [] if _all_finite(value) else None


def raise_nonfinite(layers: list[str] | None, what: str) -> None:
    where = f" in layers {layers}" if layers else ""
    raise NonFiniteError(f"{what} contains NaN or inf{where}: {_FIX}")


def check_statistics(accumulators, lc: LayerCollection, what: str = "the curvature") -> None:
    """Raise NonFiniteError naming the layers if a finalised accumulator holds NaN or inf.

    An accumulator with a ``value_range`` attribute (the diagonal, whose ``Diagonal`` node needs its
    range) has its buffer checked by :func:`~nngeo_ops.ops.value_range`, one ``aminmax`` whose
    finite extremes prove every entry finite, and the range kept there, ``(min, max, version of
    the buffer)``: one reduction for the check and the node, not a sum and then an ``aminmax``."""
    for acc in accumulators:
        flat = getattr(acc, "flat", None)  # a statistic held in one buffer: one reduction
        whole = flat() if flat is not None else None
        if whole is not None and hasattr(acc, "value_range"):
            known = getattr(acc, "known_range", None)  # taken as the values were written
            rng = known() if known is not None else None
            lo, hi, ok = rng if rng is not None else value_range(whole)
            if ok:
                acc.value_range = (lo, hi, whole._version)
                continue
        elif whole is not None and all_finite(whole):
            continue
        layers = nonfinite_layers(getattr(acc, "value", None), lc)
        if layers != []:
            raise_nonfinite(layers, f"{what} ({type(acc).__name__})")


def check_product(result: torch.Tensor, v: torch.Tensor, lc: LayerCollection, what: str) -> None:
    """Raise NonFiniteError if a product M V of finite V is not finite, naming the layers of the
    non-finite rows (``result`` of shape (P, k))."""
    if all_finite(result) or not all_finite(v):
        return
    bad = ~torch.isfinite(result.reshape(result.shape[0], -1)).all(1)
    raise_nonfinite(layers_of_rows(bad.nonzero().reshape(-1), lc), what)


def check_regul(regul) -> None:
    """A damping λ must be one finite number (a Python number or a one-element tensor, which may
    require grad); a per-parameter damping is a matrix: add it explicitly."""
    if regul is None:
        return
    if type(regul) is float or type(regul) is int:  # before the ABC check (~10 µs run cold)
        ok = math.isfinite(regul)
    elif torch.is_tensor(regul):
        if regul.numel() != 1:
            raise ArgumentTypeError(
                f"regul must be a number, got a tensor of shape {tuple(regul.shape)}; for a "
                "per-parameter damping add a diagonal explicitly: F + PMatDiag-like term, e.g. "
                "PMatExpr(lc, F.op + nngeo_ops.ops.Diagonal(d)), then solve with regul=0"
            )
        ok = bool(torch.isfinite(regul.detach()).all())
    elif isinstance(regul, numbers.Real) and not isinstance(regul, bool):
        ok = math.isfinite(regul)
    else:
        raise ArgumentTypeError(f"regul must be a number, got {type(regul).__name__}")
    if not ok:
        raise NonFiniteError(f"regul is {float(regul)}: give a finite damping (e.g. regul=1e-3)")
