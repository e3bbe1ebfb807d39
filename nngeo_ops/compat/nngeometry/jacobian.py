"""NNGeometry's ``Jacobian(model, loader, function, representation=PFMapDense, layer_collection)``."""

from __future__ import annotations

from .backend import TorchHooksJacobianBackend
from .layercollection import LayerCollection
from .object.map import PFMapDense


def Jacobian(model, loader, function=None, representation=PFMapDense, layer_collection=None):
    backend = TorchHooksJacobianBackend(model=model, function=function)
    if layer_collection is None:
        layer_collection = LayerCollection.from_model(model)
    return representation(generator=backend, examples=loader, layer_collection=layer_collection)
