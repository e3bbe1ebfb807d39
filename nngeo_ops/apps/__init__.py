"""What users do with the operators — natural-gradient training, Laplace posteriors, EWC, spectra —
on the public surface of :mod:`nngeo_ops.nn`, :mod:`nngeo_ops.ops` and :mod:`nngeo_ops.linalg`."""

from .damping import AdaptiveDamping, ConstantDamping, ScheduledDamping
from .ewc import EWC
from .laplace import Laplace, LaplaceSettings
from .optim import NaturalGradient, Preconditioner, PreconditionerSettings

__all__ = [
    "EWC",
    "AdaptiveDamping",
    "ConstantDamping",
    "Laplace",
    "LaplaceSettings",
    "NaturalGradient",
    "Preconditioner",
    "PreconditionerSettings",
    "ScheduledDamping",
]
