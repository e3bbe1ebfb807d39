"""Applications on the public surface of ``nn``, ``ops`` and ``linalg``."""

from .plotting import MissingDependencyError, plot_spectra, plot_spectrum, plot_tracker
from .spectrum import Spectrum, SpectrumSettings, SpectrumTracker, spectrum

__all__ = [
    "MissingDependencyError",
    "Spectrum",
    "SpectrumSettings",
    "SpectrumTracker",
    "plot_spectra",
    "plot_spectrum",
    "plot_tracker",
    "spectrum",
]
