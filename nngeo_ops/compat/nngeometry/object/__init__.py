"""NNGeometry's ``nngeometry.object``."""

from .fspace import FMatDense
from .map import PFMapDense, PFMapImplicit
from .pspace import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatEKFACBlockDiag,
    PMatExpr,
    PMatEye,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatMixed,
    PMatQuasiDiag,
)
from .vector import FVector, PVector

__all__ = [
    "FMatDense",
    "FVector",
    "PFMapDense",
    "PFMapImplicit",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatEKFACBlockDiag",
    "PMatExpr",
    "PMatEye",
    "PMatImplicit",
    "PMatKFAC",
    "PMatLowRank",
    "PMatMixed",
    "PMatQuasiDiag",
    "PVector",
]
