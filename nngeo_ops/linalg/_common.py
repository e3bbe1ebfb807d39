"""Small pieces shared by the linalg algorithms: settings resolution, probes, estimates.

Nothing here is specific to one algorithm; each helper exists so that every algorithm validates its
arguments and draws its random vectors in exactly the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, TypeVar

import torch

from nngeo_ops.errors import (
    ArgumentTypeError,
    DTypeDeviceError,
    InvalidArgumentError,
    NonFiniteError,
)

__all__ = [
    "Estimate",
    "resolve_settings",
    "check_positive_int",
    "sample_probes",
    "sample_stderr",
    "check_finite",
    "check_generator",
    "refuse_low_precision",
]

S = TypeVar("S")

DISTRIBUTIONS = ("rademacher", "gaussian")


class Estimate(NamedTuple):
    """A stochastic estimate and its standard error.

    The one return convention of every stochastic estimator in :mod:`nngeo_ops.linalg`
    (``hutchinson``, ``hutchpp``, ``xtrace``, ``diag_estimate``, ``slq_logdet``,
    :meth:`SLQResult.estimate`). Being a ``NamedTuple`` it unpacks as ``value, stderr = ...`` and
    also reads as ``est.value`` / ``est.stderr``.

    Attributes:
        value: the estimate; a 0-d tensor for traces and log-determinants, a (n,) tensor for
            diagonals. Same dtype and device as the operator.
        stderr: the estimated standard error of ``value`` (same shape), computed from the spread of
            the independent per-probe samples as ``std(samples, ddof=1) / sqrt(num_samples)``. It
            is ``nan`` when only one sample was drawn (no spread to measure).
    """

    value: torch.Tensor
    stderr: torch.Tensor


def resolve_settings(cls: type[S], settings: S | None, overrides: dict[str, Any]) -> S:
    """Return ``settings`` (or ``cls()``) with the keyword ``overrides`` applied.

    Overrides whose value is ``None`` are dropped, so that explicit keyword parameters defaulting
    to ``None`` mean "take the value from the settings object".
    """
    if settings is None:
        settings = cls()
    elif not isinstance(settings, cls):
        raise ArgumentTypeError(
            f"settings must be a {cls.__name__}, got {type(settings).__name__}; "
            f"build one with {cls.__name__}(...) or pass keyword overrides"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ArgumentTypeError(
            f"unknown {cls.__name__} option(s) {unknown}; valid options are {sorted(names)}"
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(settings, **given) if given else settings


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Validate an integer count such as a number of probes or iterations."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_generator(rng: Any) -> None:
    """The public ``generator=`` argument (``rng`` inside the package) must be a
    ``torch.Generator`` or None (a seed is not accepted silently)."""
    if rng is not None and not isinstance(rng, torch.Generator):
        raise ArgumentTypeError(
            f"generator must be a torch.Generator or None, got {type(rng).__name__} "
            f"({rng!r}); pass torch.Generator().manual_seed(seed) to fix the random numbers"
        )


def refuse_low_precision(dtype: torch.dtype, what: str) -> None:
    """CG and the trace / diagonal estimators accumulate in the operator's dtype; with 8 (bfloat16)
    or 11 (float16) bits of mantissa their recurrences and QR factorisations lose everything in
    a few steps (lanczos/slq upcast instead)."""
    if dtype in (torch.float16, torch.bfloat16):
        raise DTypeDeviceError(
            f"{what} got an operator of dtype {dtype}; it needs float32 or float64 (half precision "
            "loses its recurrences in a few steps); convert the operator with .to(torch.float32) "
            "or .float()"
        )


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds a NaN or an infinity."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} contains NaN or inf; clean the input before calling")


def sample_probes(
    n: int,
    k: int,
    *,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device,
    rng: torch.Generator | None,
) -> torch.Tensor:
    """Draw an (n, k) matrix of i.i.d. probe vectors with E[z zᵀ] = I.

    ``distribution`` is ``"rademacher"`` (entries ±1 with probability 1/2) or ``"gaussian"``
    (standard normal entries). The numbers are drawn on ``rng``'s device, so a CPU
    generator gives the same probes whatever device the operator lives on, then moved.
    """
    check_generator(rng)
    if distribution not in DISTRIBUTIONS:
        raise InvalidArgumentError(
            f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}"
        )
    gen_device = rng.device if rng is not None else device
    if distribution == "rademacher":
        bits = torch.randint(0, 2, (n, k), generator=rng, device=gen_device)
        z = bits.to(dtype) * 2 - 1
    else:
        z = torch.randn((n, k), generator=rng, device=gen_device, dtype=dtype)
    return z.to(device)


def sample_stderr(samples: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``std(samples, ddof=1) / sqrt(num)`` along ``dim``; ``nan`` for a single sample."""
    num = samples.shape[dim]
    if num < 2:
        shape = list(samples.shape)
        del shape[dim]
        return torch.full(shape, math.nan, dtype=samples.dtype, device=samples.device)
    return samples.std(dim=dim, correction=1) / math.sqrt(num)
