"""NNGeometry's ``nngeometry.object.fspace``: the Gram matrix (NTK) ``FMatDense`` [C, N, C, N],
our :class:`~nngeo_ops.nn.FMatDense` with NNGeometry's constructor and deprecations."""

from __future__ import annotations

import warnings

from ....nn.fspace import fmat as _fm
from .._errors import NormOrderError, UnsupportedCompatError
from ..layercollection import LayerCollection


class FMatDense(_fm.FMatDense):
    """``FMatDense(layer_collection, generator, data=None, examples=None)``: K = J Jᵀ of the
    backend's function (of the centred Jacobian with ``centering=True``)."""

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None):
        if data is None:
            from .pspace import as_loader  # pspace builds on this module

            examples = as_loader(examples)
            if hasattr(generator, "get_gram_matrix") and hasattr(generator, "jacobian_generator"):
                lc = layer_collection or LayerCollection.from_model(generator.model)
                data = generator.get_gram_matrix(examples, lc)
                super().__init__(None, data=data)
                self.generator = generator
                return
        super().__init__(generator, data=data, examples=examples)

    def norm(self, ord=None):
        if ord is None or ord == "fro":
            return self.op.frobenius_norm()
        raise NormOrderError(f"norm order {ord!r} is not supported; use None or 'fro'")

    def frobenius_norm(self):
        warnings.warn(
            "frobenius_norm() is deprecated: use norm()", DeprecationWarning, stacklevel=2
        )
        return self.op.frobenius_norm()

    def compute_eigendecomposition(self, impl: str = "eigh") -> None:
        """``impl`` "eigh" or "svd" (the same symmetric eigendecomposition of the PSD Gram matrix)."""
        if impl not in ("eigh", "svd"):
            raise UnsupportedCompatError(f"impl must be 'eigh' or 'svd', got {impl!r}")
        super().compute_eigendecomposition("eigh")
