"""A new node kind with its own rules, checked by the library's generic operator suite.

``Bidiagonal(d, e)`` is the upper-bidiagonal matrix with diagonal ``d`` (n) and superdiagonal ``e``
(n − 1). It only says how to multiply; the rules below give its solve (back substitution) and its
log-determinant (Σ log|dᵢ|) in closed form, and everything else (diag, trace, powers, eigh, ...)
comes from the library's generic routines. Run the checks with
``python -m pytest docs/examples/bidiagonal.py``.
"""

from __future__ import annotations

import torch

from nngeo_ops.ops import LinearOperator, rule
from nngeo_ops.testing import OperatorSuite


class Bidiagonal(LinearOperator):
    """The n × n upper-bidiagonal matrix with ``A[i, i] = d[i]`` and ``A[i, i + 1] = e[i]``."""

    _tensor_fields = ("d", "e")  # the tensors the node holds: fingerprints, .to(), rewrites

    def __init__(self, d: torch.Tensor, e: torch.Tensor) -> None:
        super().__init__((d.shape[0], d.shape[0]), d.dtype, d.device)
        self.d, self.e = d, e

    def _rebuild(self, **fields) -> Bidiagonal:
        return Bidiagonal(fields.get("d", self.d), fields.get("e", self.e))

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:  # X: (n, k)
        out = self.d[:, None] * X
        out[:-1] += self.e[:, None] * X[1:]
        return out

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:  # Aᵀ X
        out = self.d[:, None] * X
        out[1:] += self.e[:, None] * X[:-1]
        return out

    def to_dense(self) -> torch.Tensor:
        return torch.diag(self.d) + torch.diag(self.e, 1)

    def _str(self) -> str:
        return "Bidiag"


@rule("solve", Bidiagonal, name="back substitution")
def bidiagonal_solve(node: Bidiagonal, ctx):
    # a solve rule returns a closure X -> A⁻¹X over whatever it factorised once (nothing here)
    return lambda X: torch.linalg.solve_triangular(node.to_dense(), X, upper=True)


@rule("slogdet", Bidiagonal, name="Σ log|dᵢ|")
def bidiagonal_slogdet(node: Bidiagonal, ctx):
    return torch.sign(node.d).prod(), node.d.abs().log().sum()


class TestBidiagonal(OperatorSuite):
    """Every generic check (products, transpose, to_dense, diag, trace, logdet, solve, inverse,
    powers, gradients, float32 and float64) against the dense twin built with plain torch."""

    def params(self, dtype, gen):
        n = 7
        d = torch.rand(n, generator=gen, dtype=dtype) + 1.0  # well away from singular
        e = torch.randn(n - 1, generator=gen, dtype=dtype)
        return [d, e]

    def build(self, p):
        d, e = p
        return Bidiagonal(d, e), torch.diag(d) + torch.diag(e, 1)


def test_the_rules_ran():
    d = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    A = Bidiagonal(d, torch.ones(2, dtype=torch.float64))
    c = A.compile()
    c.slogdet()
    c.solve(torch.ones(3, dtype=torch.float64))
    plan = c.explain()
    assert "back substitution" in plan and "Σ log|dᵢ|" in plan
