"""NNGeometry's ``GramMatrix(model, loader, function, representation=FMatDense, layer_collection)``."""

from __future__ import annotations

from .backend import TorchHooksJacobianBackend
from .layercollection import LayerCollection
from .object import FMatDense


def GramMatrix(model, loader, function=None, representation=FMatDense, layer_collection=None):
    backend = TorchHooksJacobianBackend(model=model, function=function)
    if layer_collection is None:
        layer_collection = LayerCollection.from_model(model)
    return representation(generator=backend, examples=loader, layer_collection=layer_collection)
