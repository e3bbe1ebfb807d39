"""The generic operator suite lives in :mod:`nngeo_ops.testing` (importable by users); the tests of
this folder import it from here."""

from nngeo_ops.testing import TOL, OperatorSuite, close  # noqa: F401
