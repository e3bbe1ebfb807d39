"""NNGeometry's API on nngeo_ops: replace ``nngeometry`` by ``nngeo_ops.compat.nngeometry`` in imports.

The package has NNGeometry's layout (``metrics``, ``object`` with ``pspace`` / ``fspace`` /
``vector`` / ``map``, ``layercollection``, ``backend``, ``layers``, ``maths``, ``utils``) and its
signatures; every object is one of ours (see :mod:`nngeo_ops.nn`), and where NNGeometry's conventions
differ from ours (π-damped KFAC solves, EKFAC not refitted until ``update_diag``, the interleaved
weight / bias layout of ``split_weight_bias=False``) this layer follows NNGeometry's. Details and the
result of NNGeometry's own test suite: docs/compat_nngeometry.md.
"""

from .gram import GramMatrix
from .hessian import Hessian
from .jacobian import Jacobian
from .metrics import FIM, FIM_MonteCarlo

__all__ = ["FIM", "FIM_MonteCarlo", "GramMatrix", "Hessian", "Jacobian"]
