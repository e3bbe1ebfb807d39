"""The lazy operator algebra: nodes, tags, rewrite rules, compilation.

Depends on torch only (its iterative fallbacks call :mod:`nngeo_ops.linalg`, which itself never
imports ``ops``). See ``docs/ops_api.md`` for the API on one page.
"""

from . import rules  # noqa: F401  (registers every rule)
from .base import LinearOperator, as_operator
from .blockdiag import BlockDiag
from .cache import FACTORIZATIONS
from .compile import Compiled, CompilePolicy
from .composites import Product, Scale, Sum, Transpose
from .dense import Dense
from .diagonal import Diagonal, Identity, ScaledIdentity
from .eigen import Eigen
from .kronecker import Kronecker
from .leaf_checks import value_range
from .lowrank import LowRank
from .matfree import MatFree
from .permutation import AppendColumn, Permutation
from .registry import all_rules, rule
from .shifted_dense import ShiftedDense
from .symbolic import Inverse, Power

__all__ = [
    "BlockDiag",
    "CompilePolicy",
    "Compiled",
    "Dense",
    "Diagonal",
    "Eigen",
    "FACTORIZATIONS",
    "Identity",
    "Inverse",
    "Kronecker",
    "LinearOperator",
    "value_range",
    "LowRank",
    "MatFree",
    "Permutation",
    "AppendColumn",
    "Power",
    "Product",
    "Scale",
    "ScaledIdentity",
    "ShiftedDense",
    "Sum",
    "Transpose",
    "all_rules",
    "as_operator",
    "rule",
]
