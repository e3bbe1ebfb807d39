"""NNGeometry's ``Hessian(model, loader, representation, function, layer_collection)``: the Hessian
of Σ_batches function(model(x_b), y_b), ``function`` being the loss of a batch (see
:mod:`.backend.torch_func_hessian`)."""

from __future__ import annotations

from .backend import TorchFuncHessianBackend
from .layercollection import LayerCollection


def Hessian(model, loader, representation, function=None, layer_collection=None, verbose=False):
    generator = TorchFuncHessianBackend(model=model, function=function, verbose=verbose)
    if layer_collection is None:
        layer_collection = LayerCollection.from_model(model)
    return representation(generator=generator, examples=loader, layer_collection=layer_collection)
