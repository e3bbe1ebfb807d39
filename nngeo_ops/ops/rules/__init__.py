"""Rewrite rules and routines, one module per operation; importing this package registers them.

The order in which the modules are imported does not matter: dispatch order comes from each rule's
class, ``priority`` and name (see :mod:`nngeo_ops.ops.registry`).

- :mod:`.scale`, :mod:`.transpose`, :mod:`.inverse`, :mod:`.sums`, :mod:`.products`,
  :mod:`.structure` (Kronecker / BlockDiag): ``"rewrite"`` rules.
- :mod:`.power`: the ``"rewrite"`` rule of ``Power`` and the ``"power"`` rules per node kind.
- :mod:`.solve`, :mod:`.logdet`, :mod:`.diag` (diag, trace, Frobenius norm), :mod:`.eigh`:
  closed-form routines per node class.
- :mod:`.woodbury`: the pieces shared by the Woodbury solve and the determinant lemma.
- :mod:`.sylvester`: ``c·(A⊗B⊗…) + λI`` for non-symmetric factors (Schur forms).
- :mod:`.thin_shift`: ``Q·diag(λ)·Qᵀ + c·I`` with a thin ``Q`` (damped Kronecker with a low-rank
  factor), solved and log-determined without completing the basis.
- :mod:`.fallback`: dense and iterative routines used where no closed form applies.
"""

from . import (  # noqa: F401
    diag,
    eigh,
    fallback,
    inverse,
    logdet,
    power,
    products,
    scale,
    solve,
    structure,
    sums,
    sylvester,
    thin_shift,
    transpose,
    woodbury,
)
