"""NNGeometry's ``nngeometry.utils``: ``grad`` of a scalar with respect to a PVector of leaves."""

from __future__ import annotations

import torch

from ...errors import NNGeoError
from .object.vector import PVector


class NotLeafVectorError(NNGeoError, RuntimeError):
    """``grad`` needs a PVector stored per layer, whose tensors are leaves of the graph."""


def grad(output, vec, *args, **kwargs) -> PVector:
    """∂ output / ∂ vec as a PVector stored per layer. ``vec`` must be stored per layer (e.g.
    ``PVector.from_model(model)``) so that its tensors are the graph's leaves; extra arguments go
    to ``torch.autograd.grad`` (``retain_graph=True``...)."""
    if vec.dict_repr is None:
        raise NotLeafVectorError(
            "grad needs a PVector stored per layer whose tensors are leaves of the graph (e.g. "
            "PVector.from_model(model)); a flat PVector is not"
        )
    keys = list(vec.dict_repr)
    params = [t for k in keys for t in vec.dict_repr[k]]
    grads = iter(torch.autograd.grad(output, params, *args, **kwargs))
    d = {k: tuple(next(grads) for _ in vec.dict_repr[k]) for k in keys}
    return PVector(vec.layer_collection, dict_repr=d)
