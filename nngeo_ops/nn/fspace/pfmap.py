"""NNGeometry-style maps from parameter space to function space, and pushforwards J M Jᵀ.

:class:`PFMapDense` holds the dense per-example Jacobian [C, N, P]; :class:`PFMapImplicit` wraps a
:class:`~nngeo_ops.nn.fspace.jacobian.Jacobian` node. Both take a :class:`PVector` to an :class:`FVector`
(``jvp``) and back (``vjp``) and compose lazily with ops nodes. :func:`mapTMmap` pushes a
parameter-space matrix forward, J F Jᵀ, lazily or reduced per example.
"""

from __future__ import annotations

import torch

from ...errors import ArgumentTypeError, ShapeError
from ...ops import Dense, LinearOperator
from ..params import FVector, PVector, flat_fvector, flat_pvector
from .jacobian import Jacobian, jacobian_op


# ---------------------------------------------------------------------- NNGeometry-style maps
class PFMap:
    """A linear map from parameter space to function space, (C·N) × P, held as ``.op``.

    ``jvp(PVector) -> FVector``, ``vjp(FVector) -> PVector``, ``to_torch()`` [C, N, P], ``size()``,
    ``J @ x`` (PVector → FVector, tensor → tensor, ops node → lazy product) and ``J.T`` (the ops
    node Jᵀ) behave alike for the dense and implicit forms.
    """

    def __init__(
        self, layer_collection, op: LinearOperator, n_output: int, n_examples: int, generator=None
    ):
        if op.shape != (n_output * n_examples, layer_collection.numel()):
            raise ShapeError(
                f"map of shape {op.shape} for {n_output} outputs × {n_examples} examples and "
                f"{layer_collection.numel()} parameters"
            )
        self.layer_collection = layer_collection
        self.op = op
        self.n_output = n_output
        self.n_examples = n_examples
        self.generator = generator

    def size(self, dim=None):
        s = (self.n_output, self.n_examples, self.layer_collection.numel())
        return s if dim is None else s[dim]

    @property
    def T(self) -> LinearOperator:
        return self.op.T

    def jvp(self, v) -> FVector:
        flat = flat_pvector(v, self.layer_collection)
        return FVector((self.op @ flat).view(self.n_output, self.n_examples))

    mv = jvp

    def vjp(self, u) -> PVector:
        flat = flat_fvector(u, self.n_output, self.n_examples)
        return PVector(self.layer_collection, vector_repr=self.op.T @ flat)

    def __matmul__(self, other):
        if isinstance(other, PVector):
            return self.jvp(other)
        return self.op @ other

    def to_torch(self) -> torch.Tensor:
        return self.op.to_dense().view(self.n_output, self.n_examples, -1)

    get_dense_tensor = to_torch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.op}, [{self.n_output}, {self.n_examples}, {self.layer_collection.numel()}])"


class PFMapExpr(PFMap):
    """Any ops expression from parameter space to function space (e.g. ``K @ J``)."""


class PFMapDense(PFMap):
    """The Jacobian stored densely, ``data`` of shape [C, N, P]; ``op`` is a ``Dense`` (C·N) × P."""

    def __init__(self, generator=None, data=None, examples=None, layer_collection=None):
        if data is None:
            if generator is None or examples is None:
                raise ArgumentTypeError(
                    "PFMapDense needs data=[C, N, P] or a generator and examples"
                )
            data = generator.get_jacobian(examples)
        if data.dim() != 3:
            raise ShapeError(f"PFMapDense data must be [C, N, P], got {tuple(data.shape)}")
        if layer_collection is None and generator is None:
            raise ArgumentTypeError(
                "PFMapDense(data=...) needs layer_collection=... or a generator"
            )
        lc = layer_collection if layer_collection is not None else generator.layer_collection
        self.data = data
        c, n, p = data.shape
        super().__init__(
            lc, Dense(data.reshape(c * n, p), symmetric=False, name="J"), c, n, generator
        )

    def to_torch(self) -> torch.Tensor:
        """The stored Jacobian, shape ``[C, N, P]``. ``get_dense_tensor`` is an alias."""
        return self.data

    get_dense_tensor = to_torch

    def __add__(self, other):
        return PFMapDense(
            self.generator,
            data=self.data + other.to_torch(),
            layer_collection=self.layer_collection,
        )

    def __rmul__(self, x):
        return PFMapDense(
            self.generator, data=x * self.data, layer_collection=self.layer_collection
        )


class PFMapImplicit(PFMap):
    """The Jacobian known by its products: ``op`` is a :class:`Jacobian` node (JVP / VJP)."""

    def __init__(self, generator, data=None, examples=None, op: Jacobian | None = None):
        if data is not None:
            raise ArgumentTypeError("PFMapImplicit holds no data; use PFMapDense")
        if op is None:
            if examples is None:
                raise ArgumentTypeError("PFMapImplicit needs examples (a loader)")
            op = jacobian_op(generator, examples)
        self.examples = op.loader
        super().__init__(op.layer_collection, op, op.n_output, op.n_examples, generator)

    def to_torch(self) -> torch.Tensor:
        """The dense Jacobian, shape ``[C, N, P]``, computed from per-example gradients. ``get_dense_tensor``
        is an alias.
        """
        return self.op.to_torch()

    get_dense_tensor = to_torch


# ---------------------------------------------------------------------- pushforward of a PMat


def _jacobian_pfmap(self: Jacobian) -> PFMapImplicit:
    """This node as an NNGeometry-style :class:`PFMapImplicit`."""
    return PFMapImplicit(self.generator, op=self)


# The Jacobian node does not build the maps on top of it; this module lends it the method.
Jacobian.pfmap = _jacobian_pfmap
