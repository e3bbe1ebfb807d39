"""What users do with the operators (Laplace posteriors, EWC, ...), on the public surface of
:mod:`nngeo_ops.nn`, :mod:`nngeo_ops.ops` and :mod:`nngeo_ops.linalg`."""

from .ewc import EWC
from .laplace import Laplace, LaplaceSettings

__all__ = ["EWC", "Laplace", "LaplaceSettings"]
