"""The parameter space: which parameters a curvature matrix covers (:class:`LayerCollection`), and
vectors in parameter and function space (:class:`PVector`, :class:`FVector`).

A *layer* is one module together with those of its own (direct) parameters that are covered. The flat
order of every parameter-space object is the order of ``model.named_parameters()`` restricted to the
covered parameters: layers appear in the order of their first parameter, and inside a layer the
parameters keep the module's registration order (``weight`` then ``bias`` for the usual layers).
Parameters with ``requires_grad=False`` are excluded, and a parameter shared by several modules is
listed once, under its first name (as ``named_parameters`` does).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ArgumentTypeError, NNGeoError, ShapeError

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

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The layer's ``(numel,)`` flat vector as views shaped like its parameters, in flat order."""
        return tuple(t.view(s) for t, s in zip(flat.split(self.numels), self.shapes))

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
            from .layers.registry import rule_for

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


# ------------------------------------------------------------------ vectors
# Vectors in parameter space (:class:`PVector`) and in function space (:class:`FVector`).
#
# A ``PVector`` is a point of the parameter space described by a :class:`LayerCollection`. It is held
# either as one flat tensor (flat order = the collection's order, i.e. ``model.named_parameters()``
# restricted to the covered parameters) or as a dict ``layer_id -> tuple of tensors`` shaped like the
# parameters; both views are available whatever the storage.


def _check_layer_collection(lc, vector_repr) -> None:
    if isinstance(lc, nn.Module):
        raise ArgumentTypeError(
            f"a model ({type(lc).__name__}) was given where a LayerCollection is expected: pass "
            "LayerCollection.from_model(model) (or the F.layer_collection of a representation)"
        )
    if not isinstance(lc, LayerCollection):
        raise ArgumentTypeError(
            f"layer_collection must be a LayerCollection, got {type(lc).__name__}: build one with "
            "LayerCollection.from_model(model)"
        )
    if vector_repr is not None and not torch.is_tensor(vector_repr):
        raise ArgumentTypeError(
            f"the flat vector must be a tensor of shape ({lc.numel()},), got "
            f"{type(vector_repr).__name__}: convert it with torch.as_tensor"
        )


class PVector:
    """A vector in parameter space (NNGeometry-compatible).

    Construct with ``PVector(layer_collection, vector_repr=flat)`` or ``dict_repr={...}``, or from a
    model with :meth:`from_model` / :meth:`from_model_grad`, or :meth:`from_flat`.
    """

    def __init__(self, layer_collection: LayerCollection, vector_repr=None, dict_repr=None):
        if (vector_repr is None) == (dict_repr is None):
            raise NNGeoError("give exactly one of vector_repr and dict_repr")
        _check_layer_collection(layer_collection, vector_repr)
        self.layer_collection = layer_collection
        if vector_repr is not None and vector_repr.shape != (layer_collection.numel(),):
            raise ShapeError(
                f"flat vector of shape {tuple(vector_repr.shape)} for a collection of "
                f"{layer_collection.numel()} parameters"
            )
        if dict_repr is not None:
            for lid, entry in layer_collection.items():
                parts = dict_repr.get(lid)
                if parts is None or len(parts) != len(entry.shapes):
                    raise ShapeError(f"dict_repr lacks the parameters of layer {lid!r}")
                for t, s in zip(parts, entry.shapes):
                    if t.shape != s:
                        raise ShapeError(f"layer {lid!r}: got {tuple(t.shape)}, want {tuple(s)}")
        self.vector_repr = vector_repr
        self.dict_repr = dict_repr

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def from_flat(layer_collection: LayerCollection, flat: torch.Tensor) -> PVector:
        """The PVector of a flat (P,) tensor, in the collection's order (``from_flat(lc, flat)``)."""
        if torch.is_tensor(layer_collection) and isinstance(flat, LayerCollection | nn.Module):
            raise ArgumentTypeError(
                "PVector.from_flat(layer_collection, flat): the arguments are swapped; call "
                "PVector.from_flat(lc, flat_tensor)"
            )
        return PVector(layer_collection, vector_repr=flat)

    @staticmethod
    def from_model(model: nn.Module, layer_collection: LayerCollection | None = None) -> PVector:
        """The current parameter values (the tensors themselves, not copies)."""
        lc = layer_collection or LayerCollection.from_model(model)
        return PVector(lc, dict_repr=_per_layer(lc, lc.parameters(model)))

    @staticmethod
    def from_model_grad(model: nn.Module, layer_collection: LayerCollection | None = None):
        """The ``.grad`` fields of the parameters (zeros where a gradient is missing)."""
        lc = layer_collection or LayerCollection.from_model(model)
        grads = [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in lc.parameters(model)
        ]
        return PVector(lc, dict_repr=_per_layer(lc, grads))

    # ------------------------------------------------------------------ views
    def to_torch(self) -> torch.Tensor:
        """The flat tensor (in the collection's order)."""
        if self.vector_repr is not None:
            return self.vector_repr
        return torch.cat(
            [t.reshape(-1) for lid in self.layer_collection.layers for t in self.dict_repr[lid]]
        )

    get_flat_representation = to_torch

    def to_dict(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The vector per layer: ``{layer id: tensors shaped like that layer's parameters}`` (in the order
        of its ``attrs``, e.g. weight then bias), in layer-collection order.
        ``get_dict_representation`` is an alias.
        """
        if self.dict_repr is not None:
            return self.dict_repr
        return {lid: self.to_torch_layer(lid) for lid in self.layer_collection.layers}

    get_dict_representation = to_dict

    def to_torch_layer(self, layer_id: str) -> tuple[torch.Tensor, ...]:
        """The tensors of one layer, shaped like its parameters."""
        if self.dict_repr is not None:
            return self.dict_repr[layer_id]
        entry = self.layer_collection.layers[layer_id]
        start = self.layer_collection.p_pos[layer_id]
        return entry.views(self.vector_repr[start : start + entry.numel()])

    __getitem__ = to_torch_layer

    def size(self):
        """``(d,)`` with ``d`` the number of covered parameters."""
        return (self.layer_collection.numel(),)

    @property
    def dtype(self):
        """The dtype of the entries."""
        return self.to_torch().dtype

    def clone(self) -> PVector:
        """A copy with cloned tensors (same layer collection)."""
        return self._map(lambda t: t.clone())

    def detach(self) -> PVector:
        """The same vector with every tensor detached from the autograd graph."""
        return self._map(lambda t: t.detach())

    def __repr__(self) -> str:
        return f"PVector({self.layer_collection.numel()} parameters, {len(self.layer_collection)} layers)"

    # ------------------------------------------------------------------ models
    def copy_to_model(self, model: nn.Module) -> None:
        """Write the values into the model's parameters (in place)."""
        with torch.no_grad():
            for p, v in zip(self.layer_collection.parameters(model), self._flat_parts()):
                p.copy_(v)

    def add_to_model(self, model: nn.Module) -> None:
        """Add the values to the model's parameters (in place)."""
        with torch.no_grad():
            for p, v in zip(self.layer_collection.parameters(model), self._flat_parts()):
                p.add_(v)

    def copy_to_model_grad(self, model: nn.Module) -> None:
        """Write the values into the ``.grad`` fields of the model's covered parameters, the
        inverse of :meth:`from_model_grad`: an existing ``.grad`` is overwritten in place (so that
        an optimiser holding it sees the new values), a missing one is created. This is how a
        preconditioned gradient (F + λI)⁻¹ g is handed to any ``torch.optim`` optimiser."""
        with torch.no_grad():
            for p, v in zip(self.layer_collection.parameters(model), self._flat_parts()):
                if p.grad is None:
                    p.grad = v.detach().clone().to(p.dtype)
                else:
                    p.grad.copy_(v)

    def _flat_parts(self):
        return [t for lid in self.layer_collection.layers for t in self.to_torch_layer(lid)]

    # ------------------------------------------------------------------ arithmetic
    def _map(self, fn) -> PVector:
        # type(self): results of subclasses (e.g. the NNGeometry compat PVector) keep their class
        if self.vector_repr is not None:
            return type(self)(self.layer_collection, vector_repr=fn(self.vector_repr))
        d = {lid: tuple(fn(t) for t in parts) for lid, parts in self.dict_repr.items()}
        return type(self)(self.layer_collection, dict_repr=d)

    def _check(self, other) -> None:
        if not isinstance(other, PVector):
            raise TypeError(f"expected a PVector, got {type(other).__name__}")
        if other.layer_collection is not self.layer_collection and (
            other.layer_collection != self.layer_collection
        ):
            raise ShapeError("the two PVectors are over different layer collections")

    def _zip(self, other, fn) -> PVector:
        self._check(other)
        if self.dict_repr is not None and other.dict_repr is not None:
            d = {
                lid: tuple(fn(a, b) for a, b in zip(parts, other.dict_repr[lid]))
                for lid, parts in self.dict_repr.items()
            }
            return type(self)(self.layer_collection, dict_repr=d)
        return type(self)(self.layer_collection, vector_repr=fn(self.to_torch(), other.to_torch()))

    def __add__(self, other):
        return self._zip(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._zip(other, lambda a, b: a - b)

    def __neg__(self):
        return self._map(lambda t: -t)

    def __mul__(self, x):
        if isinstance(x, PVector):
            return self._zip(x, lambda a, b: a * b)
        if not isinstance(x, numbers.Number) and not (torch.is_tensor(x) and x.dim() == 0):
            return NotImplemented
        return self._map(lambda t: x * t)

    __rmul__ = __mul__

    def __truediv__(self, x):
        return self._map(lambda t: t / x)

    def __pow__(self, e):
        return self._map(lambda t: t**e)

    def dot(self, other: PVector) -> torch.Tensor:
        """``⟨v, w⟩ = Σᵢ vᵢ wᵢ`` over all covered parameters (both vectors on the same layer collection),
        a 0-dim tensor; also ``v @ w``.
        """
        self._check(other)
        return torch.dot(self.to_torch(), other.to_torch())

    __matmul__ = dot

    def norm(self, p=2) -> torch.Tensor:
        """``‖v‖_p`` of the flat vector (``p = 2`` by default), a 0-dim tensor."""
        return torch.linalg.vector_norm(self.to_torch(), ord=p)


def _per_layer(lc: LayerCollection, tensors) -> dict:
    out, it = {}, iter(tensors)
    for lid, entry in lc.items():
        out[lid] = tuple(next(it) for _ in entry.attrs)
    return out


class FVector:
    """A vector in function space: one value per (output, example), stored ``(n_output, n_examples)``."""

    def __init__(self, vector_repr: torch.Tensor):
        self.vector_repr = vector_repr

    def to_torch(self) -> torch.Tensor:
        """The stored tensor of shape ``(n_output, n_examples)``. ``get_flat_representation`` is an alias."""
        return self.vector_repr

    get_flat_representation = to_torch

    def size(self):
        """The shape ``(n_output, n_examples)``."""
        return tuple(self.vector_repr.shape)

    def _other(self, other):
        if isinstance(other, FVector):
            if other.vector_repr.shape != self.vector_repr.shape:
                raise ShapeError(
                    f"FVectors of shapes {tuple(self.vector_repr.shape)} and "
                    f"{tuple(other.vector_repr.shape)}"
                )
            return other.vector_repr
        return other

    def __add__(self, other):
        return FVector(self.vector_repr + self._other(other))

    def __sub__(self, other):
        return FVector(self.vector_repr - self._other(other))

    def __mul__(self, x):
        return FVector(self.vector_repr * self._other(x))

    __rmul__ = __mul__

    def __neg__(self):
        return FVector(-self.vector_repr)

    def dot(self, other: FVector) -> torch.Tensor:
        """``⟨f, g⟩ = Σ_{o,i} f_{o,i} g_{o,i}`` over all outputs and examples, a 0-dim tensor."""
        return (self.vector_repr * self._other(other)).sum()

    def norm(self, p=2) -> torch.Tensor:
        """``‖f‖_p`` over all entries (``p = 2`` by default), a 0-dim tensor."""
        return torch.linalg.vector_norm(self.vector_repr, ord=p)


# ---------------------------------------------------------------------- flat views
def flat_pvector(v, lc) -> torch.Tensor:
    if isinstance(v, PVector):
        if v.layer_collection != lc:
            raise ShapeError("the PVector is over a different layer collection than the Jacobian")
        return v.to_torch()
    if torch.is_tensor(v):
        return v
    raise ArgumentTypeError(f"expected a PVector or a tensor, got {type(v).__name__}")


def flat_fvector(u, c, n) -> torch.Tensor:
    t = u.to_torch() if isinstance(u, FVector) else u
    if not torch.is_tensor(t):
        raise ArgumentTypeError(f"expected an FVector or a tensor, got {type(u).__name__}")
    if tuple(t.shape) not in ((c, n), (c * n,)):
        raise ShapeError(f"function-space vector of shape {tuple(t.shape)}, expected ({c}, {n})")
    return t.reshape(-1)
