"""Test helpers for users of the library: the generic operator suite that every node of
:mod:`nngeo_ops.ops` runs through, importable so that a user checks their own node the same way.

Usage (with pytest)::

    from nngeo_ops.testing import OperatorSuite

    class TestMyNode(OperatorSuite):
        symmetric = True          # flags select which checks apply (square, invertible, psd, ...)

        def params(self, dtype, gen):
            return [torch.randn(5, dtype=dtype, generator=gen)]

        def build(self, p):       # (the node, its dense twin built independently with torch)
            return MyNode(p[0]), my_dense_matrix(p[0])

Every ``test_*`` method of :class:`OperatorSuite` then runs against the dense twin: products,
transpose, ``to_dense``, diag, trace, Frobenius norm, logdet, solve, inverse, powers, eigh, scipy
adapters and gradients with respect to the leaves, in float64 and float32. The module needs pytest
(it is imported only when tests import it).
"""

from .operator_suite import TOL, OperatorSuite, close

__all__ = ["TOL", "OperatorSuite", "close"]
