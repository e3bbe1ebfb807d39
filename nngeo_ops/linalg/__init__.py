"""Matrix-free linear algebra over operators known through their products.

The algorithms here (conjugate gradients, Lanczos, stochastic Lanczos quadrature, trace and
diagonal estimators, power iteration, the scipy adapter) accept any operator that
:func:`as_matmat` understands: a dense tensor, an object with ``.shape``/``.dtype``/``.device``
and ``@`` (the lazy nodes of :mod:`nngeo_ops.ops`, by duck typing), or a plain callable on (n, k)
matrices. This package sits below ``ops`` and ``nn`` and never imports them.

Conventions:

- Settings of an algorithm are a small frozen dataclass (``CGSettings``, ``LanczosSettings``,
  ``SLQSettings``, ``PowerSettings``) passed as ``settings=`` and/or overridden by keywords; there
  are no global switches.
- Random algorithms take ``generator: torch.Generator | None`` (the public keyword; inside the
  package the argument is called ``rng``, as "generator" also names the curvature generators of
  ``nngeo_ops.nn``); numbers are drawn on the generator's device, so a fixed CPU generator
  reproduces results on any device.
- :func:`as_matmat` is this package's normaliser (it was called ``as_operator``, a name that
  :func:`nngeo_ops.ops.as_operator` uses for building lazy nodes; the old name warns with a
  ``DeprecationWarning`` for one release).
- Stochastic estimators return :class:`Estimate` ``(value, stderr)`` (a NamedTuple).
- Errors come from :mod:`nngeo_ops.errors`; non-convergence emits ``ConvergenceWarning``.
"""

import warnings as _warnings

from ._common import Estimate
from ._matvec import MatmatOperator, as_matmat
from .cg import CGInfo, CGSettings, cg
from .cholesky import cholesky_solve
from .diagonal import diag_estimate, exact_diag
from .lanczos import LanczosSettings, lanczos, lanczos_tridiag, tridiag_matrix
from .power import PowerSettings, power_iteration
from .scipy_adapter import TorchLinearOperator, inverse_to_scipy, to_scipy
from .slq import SLQResult, SLQSettings, slq, slq_logdet, spectral_density
from .trace import hutchinson, hutchpp, xtrace

__all__ = [
    "CGInfo",
    "CGSettings",
    "Estimate",
    "LanczosSettings",
    "MatmatOperator",
    "PowerSettings",
    "SLQResult",
    "SLQSettings",
    "TorchLinearOperator",
    "as_matmat",
    "as_operator",
    "cg",
    "cholesky_solve",
    "diag_estimate",
    "exact_diag",
    "hutchinson",
    "hutchpp",
    "inverse_to_scipy",
    "lanczos",
    "lanczos_tridiag",
    "power_iteration",
    "slq",
    "slq_logdet",
    "spectral_density",
    "to_scipy",
    "tridiag_matrix",
    "xtrace",
]

# Restarted / block Lanczos and spectral densities (issue 11).
from .block_lanczos import LanczosResult, block_lanczos  # noqa: E402
from .density import (  # noqa: E402
    DensitySettings,
    SpectralDensity,
    density_from_rules,
    estimate_density,
)
from .slq import broadening_kernel  # noqa: E402

__all__ += [
    "DensitySettings",
    "LanczosResult",
    "SpectralDensity",
    "block_lanczos",
    "broadening_kernel",
    "density_from_rules",
    "estimate_density",
]


def as_operator(*args, **kwargs) -> MatmatOperator:
    """Deprecated alias of :func:`as_matmat` (removed in the next release).

    ``nngeo_ops.ops.as_operator`` builds a lazy node; this package's normaliser into a
    :class:`MatmatOperator` is :func:`as_matmat`. Same arguments, same result, plus a
    ``DeprecationWarning``.
    """
    _warnings.warn(
        "nngeo_ops.linalg.as_operator is deprecated; use nngeo_ops.linalg.as_matmat "
        "(nngeo_ops.ops.as_operator is a different function: it builds lazy nodes)",
        DeprecationWarning,
        stacklevel=2,
    )
    return as_matmat(*args, **kwargs)
