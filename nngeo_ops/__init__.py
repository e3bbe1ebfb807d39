"""nngeo_ops: curvature of neural networks (Fisher, Gauss-Newton, Hessian, NTK) as lazy linear
operators in PyTorch.

The NNGeometry-style API is available at the top level::

    from nngeo_ops import FIM, PMatDiag, PMatKFAC, PVector

    F = FIM(model=model, loader=loader, representation=PMatKFAC, n_output=10)
    F.vTMv(w - w_a)
    F.op          # the operator expression underneath (nngeo_ops.ops)

Sub-packages: :mod:`nngeo_ops.ops` (the algebra), :mod:`nngeo_ops.linalg` (algorithms),
:mod:`nngeo_ops.nn` (from models to operators), :mod:`nngeo_ops.apps`; errors in
:mod:`nngeo_ops.errors`.
"""

from . import errors, linalg, nn, ops
from .nn import *  # noqa: F403  (the NNGeometry-compatible API)
from .nn import __all__ as _nn_all

__version__ = "0.1.0"
__all__ = ["errors", "linalg", "nn", "ops", "__version__", *_nn_all]
