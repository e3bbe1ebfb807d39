"""From networks to operators: Fisher, GGN and Hessian of PyTorch models as ``ops`` expressions.

NNGeometry-compatible API: ``FIM``, ``FIM_MonteCarlo``, ``EmpiricalFisher``, ``GGN``, ``Hessian``
return a representation (``PMatDense``, ``PMatDiag``, ``PMatBlockDiag``, ``PMatKFAC``, ``PMatEKFAC``,
``PMatLowRank``, ``PMatQuasiDiag``, ``PMatImplicit``, ``PMatEye``) whose ops node is ``F.op``;
``PVector``/``FVector`` are parameter- and function-space vectors and ``LayerCollection`` selects the
covered parameters.
"""

from .api import FIM, GGN, EmpiricalFisher, FIM_MonteCarlo, Hessian
from .engine.curvature_generator import CurvatureGenerator
from .engine.jacobian_generator import JacobianGenerator
from .engine.training import StepStatistics
from .fspace.fmat import FMatDense, FMatExpr, FMatImplicit, mapTMmap
from .fspace.jacobian import Jacobian
from .fspace.ntk import CrossGramMatrix, GramMatrix, NTKRegression, kernel_regression
from .fspace.pfmap import PFMapDense, PFMapImplicit
from .layers.base import KronRule
from .layers.linear import LinearRule
from .layers.registry import register_layer_rule
from .losses import DataError
from .params import FVector, LayerCollection, PVector
from .pspace.base import (
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatExpr,
    PMatEye,
    PMatImplicit,
    PMatLowRank,
    Representation,
    build_many,
)
from .pspace.kfac import PMatEKFAC, PMatKFAC, PMatQuasiDiag

__all__ = [
    "KronRule",
    "LinearRule",
    "register_layer_rule",
    "FIM",
    "GGN",
    "CurvatureGenerator",
    "DataError",
    "EmpiricalFisher",
    "FIM_MonteCarlo",
    "FVector",
    "Hessian",
    "LayerCollection",
    "PMatAbstract",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatExpr",
    "PMatEye",
    "PMatImplicit",
    "PMatKFAC",
    "PMatLowRank",
    "PMatQuasiDiag",
    "PVector",
    "Representation",
    "StepStatistics",
    "build_many",
    "CrossGramMatrix",
    "FMatDense",
    "FMatExpr",
    "FMatImplicit",
    "GramMatrix",
    "Jacobian",
    "JacobianGenerator",
    "NTKRegression",
    "PFMapDense",
    "PFMapImplicit",
    "kernel_regression",
    "mapTMmap",
]
