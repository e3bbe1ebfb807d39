"""Applications on the public surface of :mod:`nngeo_ops.nn`, :mod:`nngeo_ops.ops` and
:mod:`nngeo_ops.linalg`."""

from .damping import AdaptiveDamping, ConstantDamping, ScheduledDamping
from .optim import NaturalGradient
from .preconditioner import Preconditioner, PreconditionerSettings

__all__ = [
    "AdaptiveDamping",
    "ConstantDamping",
    "NaturalGradient",
    "Preconditioner",
    "PreconditionerSettings",
    "ScheduledDamping",
]
