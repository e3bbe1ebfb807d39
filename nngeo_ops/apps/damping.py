"""Damping of natural-gradient steps: fixed, scheduled, or adapted by Levenberg–Marquardt.

The damping λ enters every step as (F + λI)⁻¹ g, exactly (see :mod:`nngeo_ops.apps.optim`). It is
given to :class:`~nngeo_ops.apps.NaturalGradient` / :class:`~nngeo_ops.apps.Preconditioner` as

* a number ≥ 0 (:class:`ConstantDamping`);
* a callable ``step -> λ`` of the 0-based step count (:class:`ScheduledDamping`), checked at each step;
* ``"adaptive"`` or an :class:`AdaptiveDamping`: the Levenberg–Marquardt rule of Martens & Grosse
  (2015, §6.5) from the reduction ratio ρ = (h(θ + δ) − h(θ)) / (q(δ) − q(0)) of the actual change of
  the loss to the change predicted by the damped quadratic model
  q(δ) = h(θ) + gᵀδ + ½ δᵀ(F + λI)δ, computed every ``every`` steps: λ ← ω·λ when ρ > 3/4, λ ← λ/ω
  when ρ < 1/4, with ω = (19/20)^every. It needs the loss after the step, so
  ``NaturalGradient.step(closure)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ArgumentTypeError, InvalidArgumentError


def _check(value, what="damping") -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"{what} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0:
        raise InvalidArgumentError(
            f"{what} must be a finite number >= 0 (it is λ in (F + λI)⁻¹ g), got {value!r}; "
            "pass e.g. damping=1e-3"
        )
    return v


class ConstantDamping:
    """λ fixed (a finite number ≥ 0) at every step."""

    adaptive = False

    def __init__(self, value: float):
        self.value = _check(value)

    def __call__(self, step: int) -> float:
        return self.value

    def due(self, step: int) -> bool:
        """Always False: a constant λ never measures the reduction ratio."""
        return False

    def state_dict(self) -> dict:
        """``{"value": λ}``, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore λ from :meth:`state_dict` (checked ≥ 0 and finite)."""
        self.value = _check(state["value"])

    def __repr__(self) -> str:
        return f"ConstantDamping({self.value:g})"


class ScheduledDamping:
    """λ = schedule(step) for a callable of the 0-based step count (checked ≥ 0 at each step)."""

    adaptive = False

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        return _check(self.schedule(step), "the damping schedule's value")

    def due(self, step: int) -> bool:
        """Always False: a schedule never measures the reduction ratio."""
        return False

    def state_dict(self) -> dict:
        """``{}``: the schedule is a function of the step count, which the caller checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""
        pass

    def __repr__(self) -> str:
        return f"ScheduledDamping({getattr(self.schedule, '__name__', self.schedule)!r})"


@dataclass
class AdaptiveDamping:
    """Levenberg–Marquardt damping (see the module docstring).

    Attributes:
        initial: λ at the first step.
        every: check the reduction ratio every ``every`` steps (Martens & Grosse's T₁).
        omega: the factor ω; None gives (19/20)^every.
        minimum, maximum: λ is kept in [minimum, maximum].
        lower, upper: thresholds on ρ (1/4 and 3/4).
    """

    initial: float = 1e-2
    every: int = 5
    omega: float | None = None
    minimum: float = 1e-8
    maximum: float = 1e4
    lower: float = 0.25
    upper: float = 0.75

    adaptive = True

    def __post_init__(self):
        _check(self.initial, "AdaptiveDamping.initial")
        if not isinstance(self.every, int) or self.every < 1:
            raise InvalidArgumentError(
                f"AdaptiveDamping.every must be an int >= 1, got {self.every!r}"
            )
        if self.omega is None:
            self.omega = (19 / 20) ** self.every
        if not 0 < self.omega < 1:
            raise InvalidArgumentError(f"AdaptiveDamping.omega must be in (0, 1), got {self.omega}")
        self.value = float(self.initial)
        self.last_rho = None

    def __call__(self, step: int) -> float:
        return self.value

    def due(self, step: int) -> bool:
        """Whether the reduction ratio is measured after step ``step`` (0-based)."""
        return (step + 1) % self.every == 0

    def update(self, rho: float) -> float:
        """Adapt λ from the reduction ratio ρ; returns the new λ. A non-finite ρ (the loss became
        NaN or the model predicted no decrease) counts as a failed step: λ grows."""
        self.last_rho = rho
        if not math.isfinite(rho) or rho < self.lower:
            self.value = min(self.value / self.omega, self.maximum)
        elif rho > self.upper:
            self.value = max(self.value * self.omega, self.minimum)
        return self.value

    def state_dict(self) -> dict:
        """``{"value": λ, "last_rho": ρ}`` (the current λ and the last reduction ratio), for checkpoints."""
        return {"value": self.value, "last_rho": self.last_rho}

    def load_state_dict(self, state: dict) -> None:
        """Restore λ (checked ≥ 0 and finite) and the last reduction ratio from :meth:`state_dict`."""
        self.value = _check(state["value"])
        self.last_rho = state.get("last_rho")


def as_damping(spec):
    """A damping object from what the user passed (number, callable, "adaptive", or an object)."""
    if isinstance(spec, ConstantDamping | ScheduledDamping):
        return spec
    if isinstance(spec, AdaptiveDamping):
        return AdaptiveDamping(**{k: getattr(spec, k) for k in spec.__dataclass_fields__})
    if isinstance(spec, str):
        if spec == "adaptive":
            return AdaptiveDamping()
        raise InvalidArgumentError(
            f"damping={spec!r} is not understood; pass a number, a callable of the step, "
            "'adaptive' or an AdaptiveDamping(...)"
        )
    if callable(spec):
        return ScheduledDamping(spec)
    return ConstantDamping(spec)
