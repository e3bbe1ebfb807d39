"""Errors of the NNGeometry compatibility layer: ours, also deriving from the built-in exception
NNGeometry raises in the same situation (so ``except RuntimeError`` written for NNGeometry, and
``except NNGeoError`` written for nngeo_ops, both catch them)."""

from ...errors import InvalidArgumentError, UnsupportedError


class NormOrderError(InvalidArgumentError, RuntimeError):
    """A matrix norm of an order that is not supported (NNGeometry raises RuntimeError)."""


class UnsupportedCompatError(UnsupportedError):
    """An option NNGeometry does not offer either (NotImplementedError there too)."""


class NoGeneratorError(UnsupportedError, AttributeError):
    """A computation that needs the model and data on a representation restored from a pickle
    (NNGeometry replaces the generator by a ``DummyGenerator`` then: an AttributeError there)."""
