"""What users do with the operators — natural-gradient training, Laplace posteriors, EWC, spectra —
on the public surface of :mod:`nngeo_ops.nn`, :mod:`nngeo_ops.ops` and :mod:`nngeo_ops.linalg`."""

from .damping import AdaptiveDamping, ConstantDamping, ScheduledDamping
from .ewc import EWC
from .laplace import Laplace, LaplaceSettings
from .optim import NaturalGradient, Preconditioner, PreconditionerSettings
from .plotting import MissingDependencyError, plot_spectra, plot_spectrum, plot_tracker
from .spectrum import Spectrum, SpectrumSettings, SpectrumTracker, spectrum

__all__ = [
    "EWC",
    "AdaptiveDamping",
    "ConstantDamping",
    "Laplace",
    "LaplaceSettings",
    "MissingDependencyError",
    "NaturalGradient",
    "Preconditioner",
    "PreconditionerSettings",
    "ScheduledDamping",
    "Spectrum",
    "SpectrumSettings",
    "SpectrumTracker",
    "plot_spectra",
    "plot_spectrum",
    "plot_tracker",
    "spectrum",
]
