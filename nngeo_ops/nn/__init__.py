"""From networks to operators: Fisher, GGN and Hessian of PyTorch models as ``ops`` expressions.

NNGeometry-compatible API: ``FIM``, ``FIM_MonteCarlo``, ``EmpiricalFisher``, ``GGN``, ``Hessian``
return a representation (``PMatDense``, ``PMatDiag``, ``PMatBlockDiag``, ``PMatKFAC``, ``PMatEKFAC``,
``PMatLowRank``, ``PMatQuasiDiag``, ``PMatImplicit``, ``PMatEye``) whose ops node is ``F.op``;
``PVector``/``FVector`` are parameter- and function-space vectors and ``LayerCollection`` selects the
covered parameters.
"""

from .fmat import FMatDense, FMatExpr, FMatImplicit
from .generator import CurvatureGenerator
from .jacobian import Jacobian
from .jacobian_generator import JacobianGenerator
from .kfac import PMatEKFAC, PMatKFAC, PMatQuasiDiag
from .layercollection import LayerCollection
from .metrics import FIM, GGN, EmpiricalFisher, FIM_MonteCarlo, Hessian
from .ntk import CrossGramMatrix, GramMatrix, NTKRegression, kernel_regression
from .outputs import DataError
from .pfmap import PFMapDense, PFMapImplicit, mapTMmap
from .pmat import (
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatExpr,
    PMatEye,
    PMatImplicit,
    PMatLowRank,
    build_many,
)
from .rules import KronRule, LinearRule, register_layer_rule
from .training import StepStatistics
from .vector import FVector, PVector

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
