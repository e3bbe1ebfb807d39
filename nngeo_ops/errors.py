"""The library's exception hierarchy.

Every error raised on purpose by nngeo_ops derives from :class:`NNGeoError` *and* from the matching
built-in exception, so callers can catch either ``nngeo_ops.errors.ShapeError`` or a plain
``ValueError``.
"""

from __future__ import annotations


class NNGeoError(Exception):
    """Base class of every error raised on purpose by nngeo_ops."""


class ShapeError(NNGeoError, ValueError):
    """Operand shapes do not fit the operation (message names both shapes)."""


class DTypeDeviceError(NNGeoError, TypeError):
    """Operands live in different dtypes or devices; convert one with ``.to(...)``."""


class NotPSDError(NNGeoError, ValueError):
    """An operation that needs a symmetric positive (semi-)definite matrix got one that is not."""


class NotSymmetricError(NNGeoError, ValueError):
    """An operation defined only for symmetric matrices got a node not tagged symmetric."""


class SingularError(NNGeoError, ValueError):
    """A solve or inverse of a singular matrix (zero diagonal entry, zero eigenvalue, ...)."""


class NonFiniteError(NNGeoError, ValueError):
    """NaN or inf found in inputs or statistics."""


class UnsupportedError(NNGeoError, NotImplementedError):
    """A documented combination that is not supported (e.g. a layer without a structured rule)."""


class DataError(NNGeoError, ValueError):
    """The data do not fit: an empty loader, labels outside the classes, unnormalised log-probs."""


class MissingDependencyError(NNGeoError, ImportError):
    """An optional dependency is not installed (matplotlib for the plots); the message names the
    ``pip install`` that fixes it."""


class ConvergenceWarning(UserWarning):
    """An iterative routine stopped before reaching its tolerance."""


class StochasticFallbackWarning(UserWarning):
    """A quantity was estimated (stochastic trace / diagonal / log-determinant) because no exact
    routine matched; the message names the node that blocked the exact route and the standard
    error. ``CompilePolicy(exact=True)`` turns it into :class:`InexactError`."""


class InexactError(NNGeoError, NotImplementedError):
    """Only an estimate is available, and the caller asked for exact results
    (``CompilePolicy(exact=True)``)."""


class InvalidArgumentError(NNGeoError, ValueError):
    """An argument has a value outside what the function accepts (a count, a tolerance, ...)."""


class ArgumentTypeError(NNGeoError, TypeError):
    """An argument is of the wrong kind (not a tensor, not a node, wrong number of dimensions)."""


class MemoryLimitError(NNGeoError, MemoryError):
    """A dense object would exceed the memory limit (message names its size and a structure that
    fits)."""


class ModelStateError(NNGeoError, RuntimeError):
    """The model is in a state where the quantity is undefined (e.g. BatchNorm in training mode
    couples the examples of a batch, so per-example Jacobians do not exist)."""


class MixedDTypeError(DTypeDeviceError, ValueError):
    """The covered parameters of a model have different dtypes; convert the model with ``.to(dtype)``."""
