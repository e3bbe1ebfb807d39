"""NNGeometry's ``nngeometry.layercollection``: our :class:`~nngeo_ops.nn.LayerCollection` with
NNGeometry's layer objects.

A layer of the collection is an entry of ours (module path, covered parameters, shapes) whose class
says its kind as NNGeometry names it (``LinearLayer``, ``Conv2dLayer``, ...) and which exposes
``weight`` / ``bias`` descriptors with ``numel()`` and ``size``, ``has_bias()`` and ``transposed``.
The flat order is ours, which is NNGeometry's: layers in collection order, weight then bias.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ...nn import params as _lc
from ...nn.params import LayerEntry


class Parameter:
    """The shape of one parameter of a layer (NNGeometry's ``layer.weight`` / ``layer.bias``)."""

    def __init__(self, *size):
        self.size = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)

    def numel(self) -> int:
        return int(self.size.numel())

    def __repr__(self) -> str:
        return f"Parameter{tuple(self.size)}"


class AbstractLayer(LayerEntry):
    """A layer entry with NNGeometry's accessors. ``transposed``: W is stored (in, out, ...)."""

    transposed = False

    @property
    def weight(self) -> Parameter:
        return Parameter(self.shapes[self.attrs.index("weight")])

    @property
    def bias(self) -> Parameter | None:
        return Parameter(self.shapes[self.attrs.index("bias")]) if self.has_bias() else None


def _layer_class(name: str, transposed: bool = False) -> type:
    return type(name, (AbstractLayer,), {"transposed": transposed, "__module__": __name__})


LinearLayer = _layer_class("LinearLayer")
Conv1dLayer = _layer_class("Conv1dLayer")
Conv2dLayer = _layer_class("Conv2dLayer")
ConvTranspose2dLayer = _layer_class("ConvTranspose2dLayer", transposed=True)
EmbeddingLayer = _layer_class("EmbeddingLayer")
BatchNorm1dLayer = _layer_class("BatchNorm1dLayer")
BatchNorm2dLayer = _layer_class("BatchNorm2dLayer")
GroupNormLayer = _layer_class("GroupNormLayer")
LayerNormLayer = _layer_class("LayerNormLayer")
RMSNormLayer = _layer_class("RMSNormLayer")
WeightNorm1dLayer = _layer_class("WeightNorm1dLayer")
WeightNorm2dLayer = _layer_class("WeightNorm2dLayer")
Cosine1dLayer = _layer_class("Cosine1dLayer")
Affine1dLayer = _layer_class("Affine1dLayer")
GenericLayer = _layer_class("GenericLayer")  # any other module: the generic torch.func path

_BY_KIND = {
    "Linear": LinearLayer,
    "Conv1d": Conv1dLayer,
    "Conv2d": Conv2dLayer,
    "ConvTranspose2d": ConvTranspose2dLayer,
    "Embedding": EmbeddingLayer,
    "BatchNorm1d": BatchNorm1dLayer,
    "BatchNorm2d": BatchNorm2dLayer,
    "GroupNorm": GroupNormLayer,
    "LayerNorm": LayerNormLayer,
    "RMSNorm": RMSNormLayer,
    "WeightNorm1d": WeightNorm1dLayer,
    "WeightNorm2d": WeightNorm2dLayer,
    "Cosine1d": Cosine1dLayer,
    "Affine1d": Affine1dLayer,
}


def as_layer(entry: LayerEntry) -> AbstractLayer:
    """The NNGeometry-style layer object of an entry of ours (same fields)."""
    if isinstance(entry, AbstractLayer):
        return entry
    cls = _BY_KIND.get(entry.kind, GenericLayer)
    return cls(entry.module_name, entry.kind, entry.attrs, entry.shapes)


class LayerCollection(_lc.LayerCollection):
    """Our layer collection with NNGeometry's constructors and layer objects.

    ``LayerCollection()`` is empty; :meth:`add_layer` / :meth:`add_layer_from_model` append a layer
    (flat offsets follow the order of addition); ``from_model`` covers every trainable parameter
    (NNGeometry's ``ignore_unsupported_layers`` is accepted: with it, modules without a structured
    rule are left out, as NNGeometry leaves out modules it has no layer class for).
    """

    def __init__(self, layers=None):
        super().__init__(OrderedDict((k, as_layer(v)) for k, v in (layers or {}).items()))

    @classmethod
    def _convert(cls, ours: _lc.LayerCollection) -> LayerCollection:
        return cls(ours.layers)

    @staticmethod
    def from_model(model, ignore_unsupported_layers: bool = False) -> LayerCollection:
        return LayerCollection._convert(
            _lc.LayerCollection.from_model(model, ignore_unsupported_layers)
        )

    @staticmethod
    def from_modules(model, modules) -> LayerCollection:
        return LayerCollection._convert(_lc.LayerCollection.from_modules(model, modules))

    @staticmethod
    def from_parameter_names(model, names) -> LayerCollection:
        return LayerCollection._convert(_lc.LayerCollection.from_parameter_names(model, names))

    def add_layer(self, layer_id: str, layer: LayerEntry) -> None:
        """Append a layer (an entry of another collection) under ``layer_id``."""
        self._add(layer_id, as_layer(layer))

    def add_layer_from_model(self, model, module) -> None:
        """Append the trainable direct parameters of ``module``, a submodule of ``model``."""
        sub = _lc.LayerCollection.from_modules(model, [module])
        for lid, entry in sub.layers.items():
            self.add_layer(lid, entry)

    def merge(self, other) -> LayerCollection:
        return LayerCollection._convert(super().merge(other))

    def __getitem__(self, layer_id: str) -> AbstractLayer:
        return self.layers[layer_id]

    def get_layerid_module_map(self, model):
        return super().get_layerid_module_map(model)

    def named_parameters(self, layerid_to_module):
        """NNGeometry's form: ``(name, parameter)`` pairs from a ``{layer_id: module}`` map (or a
        model)."""
        if isinstance(layerid_to_module, torch.nn.Module):
            return super().named_parameters(layerid_to_module)
        out = []
        for lid, entry in self.layers.items():
            mod = layerid_to_module[lid]
            for attr in entry.attrs:
                out.append((f"{lid}.{attr}", getattr(mod, attr)))
        return out
