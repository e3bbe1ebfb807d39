"""The bad-input table of the operator algebra and the linear algebra (ops/ and linalg/).

Each row is one mistake a user makes, the exception it must raise (from ``nngeo_ops.errors``,
hence also the matching built-in) and words its message must contain: the problem and the fix.
The nn half of the table is ``tests/nn/test_bad_inputs_nn.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nngeo_ops import errors
from nngeo_ops.linalg import cg, hutchinson, hutchpp, inverse_to_scipy
from nngeo_ops.ops import (
    CompilePolicy,
    Dense,
    Diagonal,
    Eigen,
    Identity,
    LowRank,
    MatFree,
    ScaledIdentity,
    Sum,
)

F64 = torch.float64


def _spd(n, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=F64)
    return ((B @ B.mT + (B @ B.mT).mT) / (2 * n) + torch.eye(n, dtype=F64)).to(dtype)


def _nan_vec(n=5):
    d = torch.ones(n, dtype=F64)
    d[2] = math.nan
    return d


def _inf_mat(n=5, k=2):
    U = torch.ones(n, k, dtype=F64)
    U[1, 0] = math.inf
    return U


def _nonsym():
    M = _spd(4)
    M[0, 1] += 1.0
    return M


class _PMatLike:
    """What nn representations look like to ops/linalg: an object with ``.op``."""

    def __init__(self, op):
        self.op = op


# (id, callable raising, exception type, words the message must contain)
TABLE = [
    # --- leaves: one finiteness check for every leaf
    ("diagonal-nan", lambda: Diagonal(_nan_vec()), errors.NonFiniteError, ["NaN or inf", "clean"]),
    ("lowrank-inf", lambda: LowRank(_inf_mat()), errors.NonFiniteError, ["LowRank U", "clean"]),
    (
        "lowrank-core-nan",
        lambda: LowRank(torch.ones(5, 1, dtype=F64), torch.full((1, 1), math.nan, dtype=F64)),
        errors.NonFiniteError,
        ["LowRank C"],
    ),
    (
        "eigen-nan",
        lambda: Eigen(torch.eye(5, dtype=F64), _nan_vec()),
        errors.NonFiniteError,
        ["eigenvalues"],
    ),
    ("identity-nan", lambda: math.nan * Identity(3), errors.NonFiniteError, ["finite"]),
    (
        "dense-nan-solve",
        lambda: Dense(torch.full((3, 3), math.nan, dtype=F64)).solve(torch.ones(3, dtype=F64)),
        errors.NonFiniteError,
        ["NaN or inf"],
    ),
    # --- tags given by the user are verified
    (
        "symmetric-tag-on-nonsymmetric",
        lambda: Dense(_nonsym(), symmetric=True),
        errors.NotSymmetricError,
        ["tagged symmetric", "(M + M.mT) / 2", "drop the tag"],
    ),
    (
        "psd-tag-on-nonsymmetric",
        lambda: Dense(_nonsym(), psd=True),
        errors.NotSymmetricError,
        ["tagged symmetric"],
    ),
    (
        "psd-tag-on-indefinite-eigh",
        lambda: Dense(torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=F64)), psd=True).eigh(),
        errors.NotPSDError,
        ["psd=True", "eigenvalue"],
    ),
    (
        "psd-tag-on-indefinite-cholesky",
        lambda: Dense(torch.diag(torch.tensor([1.0, -2.0], dtype=F64)), psd=True).solve(
            torch.ones(2, dtype=F64)
        ),
        errors.NotPSDError,
        ["not positive definite", "damping"],
    ),
    # --- argument validation
    (
        "identity-negative",
        lambda: Identity(-3),
        errors.InvalidArgumentError,
        ["non-negative int", "A.shape[0]"],
    ),
    (
        "identity-float-size",
        lambda: Identity(2.5),
        errors.InvalidArgumentError,
        ["non-negative int"],
    ),
    (
        "scaled-identity-vector",
        lambda: ScaledIdentity(torch.ones(3), 3),
        errors.ArgumentTypeError,
        ["Diagonal(d)"],
    ),
    (
        "lowrank-numpy",
        lambda: LowRank(np.ones((4, 2))),
        errors.ArgumentTypeError,
        ["torch.Tensor", "torch.as_tensor"],
    ),
    (
        "generator-seed",
        lambda: hutchinson(torch.eye(4, dtype=F64), 3, generator=0),
        errors.ArgumentTypeError,
        ["torch.Generator", "manual_seed"],
    ),
    (
        "generator-numpy",
        lambda: hutchpp(torch.eye(10, dtype=F64), 6, generator=np.random.default_rng(0)),
        errors.ArgumentTypeError,
        ["torch.Generator"],
    ),
    (
        "probes-zero",
        lambda: hutchinson(torch.eye(4, dtype=F64), 0),
        errors.InvalidArgumentError,
        ["num_probes", ">= 1"],
    ),
    (
        "not-an-operator",
        lambda: Sum(Dense(_spd(3)), "I"),
        errors.ArgumentTypeError,
        ["Dense(M)", "F.op"],
    ),
    # --- CG names the cause
    (
        "cg-nonsymmetric-tensor",
        lambda: cg(_nonsym(), torch.ones(4, dtype=F64)),
        errors.NotSymmetricError,
        ["symmetric", "(A + A.mT) / 2"],
    ),
    (
        "cg-node-tagged-nonsymmetric",
        lambda: cg(Dense(_nonsym()), torch.ones(4, dtype=F64)),
        errors.NotSymmetricError,
        ["symmetric=False", "gmres"],
    ),
    (
        "cg-singular",
        lambda: cg(torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=F64)), torch.ones(3, dtype=F64)),
        errors.NotPSDError,
        ["singular", "damping"],
    ),
    # --- low precision
    (
        "hutchpp-half",
        lambda: hutchpp(torch.eye(4, dtype=torch.float16), 6),
        errors.DTypeDeviceError,
        ["float16", ".float()"],
    ),
    (
        "cg-bfloat16",
        lambda: cg(torch.eye(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)),
        errors.DTypeDeviceError,
        ["bfloat16", ".float()"],
    ),
    # --- stochastic fallbacks under exact=True
    (
        "exact-policy-estimate",
        lambda: (
            (
                Dense(_spd(8), psd=True)
                + MatFree(lambda X: X, (8, 8), F64, symmetric=True, psd=True, batched=True)
            )
            .compile(CompilePolicy(dense_limit=0, num_matvecs=4, exact=True))
            .logdet()
        ),
        errors.InexactError,
        ["exact=True", "dense_limit"],
    ),
    # --- scipy adapter with a solve that takes no shift
    (
        "inverse-to-scipy-solve-without-regul",
        lambda: inverse_to_scipy(_SolveOnly(), sigma=0.5),
        errors.UnsupportedError,
        ["regul", "solve="],
    ),
]


class _SolveOnly:
    shape, dtype, device = (3, 3), F64, torch.device("cpu")

    def __matmul__(self, X):
        return X

    def solve(self, B):
        return B


@pytest.mark.parametrize("make, exc, words", [r[1:] for r in TABLE], ids=[r[0] for r in TABLE])
def test_bad_input(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"


# ---------------------------------------------------------------- what is now accepted instead
def test_half_precision_dense_solve_and_logdet_upcast():
    M = _spd(6)
    for dt in (torch.float16, torch.bfloat16):
        for psd in (True, False):
            A = Dense(M.to(dt), psd=psd)
            x = A.solve(torch.ones(6, dtype=dt))
            assert x.dtype == dt
            torch.testing.assert_close(
                x.double(), torch.linalg.solve(M, torch.ones(6, dtype=F64)), atol=1e-2, rtol=1e-2
            )
            torch.testing.assert_close(A.logdet().double(), torch.logdet(M), atol=0.1, rtol=1e-2)


def test_inverse_to_scipy_with_a_shift_on_a_node():
    from scipy.sparse.linalg import eigsh

    M = _spd(20)
    A = Dense(M, psd=True)
    sigma = float(torch.linalg.eigvalsh(M)[3]) + 1e-3
    Op = inverse_to_scipy(A, sigma=sigma)
    x = np.random.default_rng(0).standard_normal(20)
    ref = torch.linalg.solve(M - sigma * torch.eye(20, dtype=F64), torch.from_numpy(x))
    np.testing.assert_allclose(Op.matvec(x), ref.numpy(), rtol=1e-8)
    vals = eigsh(A.to_scipy(), k=1, sigma=sigma, OPinv=Op, return_eigenvectors=False)
    np.testing.assert_allclose(vals, torch.linalg.eigvalsh(M)[3:4].numpy(), rtol=1e-8)


def test_representations_are_accepted_where_an_operator_is_expected():
    M = _spd(5)
    F = _PMatLike(Dense(M, psd=True))
    b = torch.ones(5, dtype=F64)
    torch.testing.assert_close(cg(F, b, tol=1e-12)[0], torch.linalg.solve(M, b))
    torch.testing.assert_close(hutchpp(F, 10).value, M.trace())
    torch.testing.assert_close(
        (Sum(F, Identity(5))).solve(b), torch.linalg.solve(M + torch.eye(5, dtype=F64), b)
    )


def test_symmetric_tag_tolerates_round_off():
    B = torch.randn(30, 30, dtype=torch.float32)
    M = B @ B.mT  # symmetric up to round-off only
    assert Dense(M, psd=True).psd


def test_cache_sees_changes_through_data():
    """``.data`` writes do not move the version counter; the content checksum catches them."""
    M = _spd(6)
    A = Dense(M, psd=True)
    b = torch.ones(6, dtype=F64)
    A.solve(b)
    A.logdet()
    M.data.mul_(2.0)
    torch.testing.assert_close(A.solve(b), torch.linalg.solve(M, b))
    torch.testing.assert_close(A.logdet(), torch.logdet(M))
    d = torch.ones(6, dtype=F64)
    D = Diagonal(d)
    D.solve(b)
    d.data[0] = 4.0
    torch.testing.assert_close(D.solve(b)[0], torch.tensor(0.25, dtype=F64))


def test_cache_of_a_large_leaf_sees_data_rescaling_and_invalidate():
    """Above 65536 entries the checksum reads a sample: a rescaling or a copy of new values through
    ``.data`` is caught; a write to a few entries needs ``invalidate()`` (documented)."""
    n = 100_000
    d = torch.linspace(1.0, 2.0, n, dtype=F64)
    D = Diagonal(d)
    b = torch.ones(n, dtype=F64)
    D.solve(b)
    d.data.mul_(2.0)
    torch.testing.assert_close(D.solve(b), 1.0 / d)
    d.data[1] = 8.0  # off the sample
    D.invalidate()
    assert float(D.solve(b)[1]) == 0.125
