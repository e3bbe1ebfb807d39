"""Which parameters of a model a curvature matrix covers, and in which order.

A *layer* is one module together with those of its own (direct) parameters that are covered. The flat
order of every parameter-space object is the order of ``model.named_parameters()`` restricted to the
covered parameters: layers appear in the order of their first parameter, and inside a layer the
parameters keep the module's registration order (``weight`` then ``bias`` for the usual layers).
Parameters with ``requires_grad=False`` are excluded, and a parameter shared by several modules is
listed once, under its first name (as ``named_parameters`` does).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NNGeoError, ShapeError

ROOT_ID = "<root>"  # layer id of parameters registered directly on the model itself


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


@dataclass
class LayerEntry:
    """One layer: a module path and its covered direct parameters.

    ``module_name`` is the path of the module in ``model.named_modules()`` ('' for the model itself),
    ``attrs`` the attribute names of the covered parameters (``("weight", "bias")``), ``shapes`` their
    shapes, in flat order.
    """

    module_name: str
    kind: str
    attrs: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        self.numels = tuple(int(torch.Size(s).numel()) for s in self.shapes)

    def numel(self) -> int:
        return sum(self.numels)

    @property
    def param_names(self) -> tuple[str, ...]:
        pre = self.module_name + "." if self.module_name else ""
        return tuple(pre + a for a in self.attrs)

    def has_bias(self) -> bool:
        return "bias" in self.attrs

    def __repr__(self) -> str:
        parts = ", ".join(f"{a}{tuple(s)}" for a, s in zip(self.attrs, self.shapes))
        return f"{self.kind}[{parts}]"


class LayerCollection:
    """An ordered set of layers (see the module docstring for the flat order).

    Build it with :meth:`from_model`, :meth:`from_modules` or :meth:`from_parameter_names`;
    :meth:`merge` joins two collections of the same model. ``p_pos[layer_id]`` is the offset of the
    layer in flat vectors, ``numel()`` the total number of covered scalars.
    """

    def __init__(self, layers: OrderedDict | None = None):
        self.layers: OrderedDict[str, LayerEntry] = OrderedDict()
        self.p_pos: dict[str, int] = {}
        self._numel = 0
        for lid, entry in (layers or {}).items():
            self._add(lid, entry)

    def _add(self, layer_id: str, entry: LayerEntry) -> None:
        if layer_id in self.layers:
            raise NNGeoError(f"layer {layer_id!r} is already in the collection")
        self.layers[layer_id] = entry
        self.p_pos[layer_id] = self._numel
        self._numel += entry.numel()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_model(model: nn.Module, ignore_unsupported_layers: bool = False) -> LayerCollection:
        """Every trainable parameter of ``model``.

        With ``ignore_unsupported_layers=True`` only modules that have a structured (KFAC) rule are kept,
        as NNGeometry does; by default every module is kept and those without a rule use the generic
        per-example-gradient path.
        """
        keep = None
        if ignore_unsupported_layers:
            from .rules import rule_for

            keep = lambda mod: rule_for(mod) is not None  # noqa: E731
        return LayerCollection._build(model, lambda name: True, keep)

    @staticmethod
    def from_modules(model: nn.Module, modules) -> LayerCollection:
        """The trainable direct parameters of the given modules (objects or names) of ``model``."""
        names = {}
        for m_name, m in model.named_modules():
            names[id(m)] = m_name
        wanted = set()
        for m in modules:
            if isinstance(m, str):
                wanted.add(m)
            elif id(m) in names:
                wanted.add(names[id(m)])
            else:
                raise NNGeoError(f"module {type(m).__name__} is not a submodule of the model")
        known = set(names.values())
        missing = wanted - known
        if missing:
            raise NNGeoError(f"no module named {sorted(missing)} in the model")
        return LayerCollection._build(model, lambda name: _split(name)[0] in wanted, None)

    @staticmethod
    def from_parameter_names(model: nn.Module, names) -> LayerCollection:
        """Exactly the named parameters (names as in ``model.named_parameters()``)."""
        wanted = set(names)
        known = {n for n, _ in model.named_parameters()}
        missing = wanted - known
        if missing:
            raise NNGeoError(f"no parameter named {sorted(missing)} in the model")
        return LayerCollection._build(model, lambda name: name in wanted, None)

    @staticmethod
    def _build(model, take_param, keep_module) -> LayerCollection:
        modules = dict(model.named_modules())
        groups: OrderedDict[str, list] = OrderedDict()
        for name, p in model.named_parameters():
            if not p.requires_grad or not take_param(name):
                continue
            mod_name, attr = _split(name)
            if keep_module is not None and not keep_module(modules[mod_name]):
                continue
            if mod_name in groups and next(reversed(groups)) != mod_name:
                raise NNGeoError(f"parameters of module {mod_name!r} are not contiguous")
            groups.setdefault(mod_name, []).append((attr, p.shape))
        lc = LayerCollection()
        for mod_name, items in groups.items():
            kind = type(modules[mod_name]).__name__
            entry = LayerEntry(
                mod_name, kind, tuple(a for a, _ in items), tuple(torch.Size(s) for _, s in items)
            )
            lc._add(mod_name or ROOT_ID, entry)
        return lc

    def merge(self, other: LayerCollection) -> LayerCollection:
        """Union of two collections; layers of ``self`` first, then the new layers of ``other``."""
        out = LayerCollection(self.layers)
        for lid, entry in other.layers.items():
            if lid in out.layers:
                if out.layers[lid].attrs != entry.attrs:
                    raise NNGeoError(f"layer {lid!r} covers different parameters in the two")
                continue
            out._add(lid, entry)
        return out

    # ------------------------------------------------------------------ queries
    def numel(self) -> int:
        """``d``, the total number of covered parameters."""
        return self._numel

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other) -> bool:
        return isinstance(other, LayerCollection) and list(self.layers.items()) == list(
            other.layers.items()
        )

    def __hash__(self):  # collections are compared by content, used as dict keys rarely
        return hash(tuple(self.layers))

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {v!r}" for k, v in self.layers.items())
        return f"LayerCollection({body})"

    def layer_slices(self) -> dict[str, slice]:
        """``{layer id: slice}`` of each layer's entries in the flat parameter vector (layer-collection
        order; within a layer, its ``attrs`` in order, each flattened row-major).
        """
        return {lid: slice(self.p_pos[lid], self.p_pos[lid] + e.numel()) for lid, e in self.items()}

    def items(self):
        """``(layer id, entry)`` pairs in layer-collection order."""
        return self.layers.items()

    def get_layerid_module_map(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{layer id: module of model}``; raises :class:`~nngeo_ops.errors.NNGeoError` when ``model``
        has no module of that name.
        """
        modules = dict(model.named_modules())
        try:
            return {lid: modules[e.module_name] for lid, e in self.items()}
        except KeyError as err:
            raise NNGeoError(f"model has no module {err.args[0]!r} of this collection") from None

    def parameters(self, model: nn.Module) -> list[torch.Tensor]:
        """The covered parameter tensors of ``model``, in flat order."""
        out = []
        for lid, mod in self.get_layerid_module_map(model).items():
            entry = self.layers[lid]
            for attr, shape in zip(entry.attrs, entry.shapes):
                p = getattr(mod, attr)
                if p.shape != shape:
                    raise ShapeError(
                        f"parameter {lid}.{attr} has shape {tuple(p.shape)}, the collection "
                        f"expects {tuple(shape)}"
                    )
                out.append(p)
        return out

    def flat_parameters(self, model: nn.Module) -> torch.Tensor:
        """The covered parameters of ``model`` as one detached flat vector (a copy), in flat order."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters(model)])

    def named_parameters(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """``(name, parameter)`` pairs of the covered parameters of ``model``, in flat order."""
        names = [n for e in self.layers.values() for n in e.param_names]
        return list(zip(names, self.parameters(model)))
