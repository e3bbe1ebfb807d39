"""NNGeometry's ``TorchFuncHessianBackend``: the Hessian of ``function(model(x), y)`` summed over batches.

NNGeometry's Hessian takes ``function(prediction, target) -> scalar`` (the loss of a batch, e.g.
``cross_entropy(..., reduction="sum")``) and returns Σ_batches ∇²_θ function(model(x_b), y_b). It is
our ``"hessian"`` generator with :class:`FunctionLoss` as output model (reduction ``"sum"``: nothing
is divided).
"""

from __future__ import annotations

from ....errors import ArgumentTypeError
from ....nn.engine.curvature_generator import CurvatureGenerator
from ....nn.losses import OutputModel
from .torch_hooks.torch_hooks import check_same_dtype


class FunctionLoss(OutputModel):
    """An output model whose loss is a user function ``f(prediction, target) -> scalar``."""

    name = "function"
    reduction = "sum"

    def __init__(self, function):
        if not callable(function):
            raise ArgumentTypeError(
                "the Hessian needs function(prediction, target) -> scalar loss, got "
                f"{type(function).__name__}"
            )
        self.function = function

    def loss(self, out, y):
        return self.function(out, y), out.shape[0]


class TorchFuncHessianBackend:
    """``TorchFuncHessianBackend(model, function, verbose=False)``: ``function`` is the loss."""

    def __init__(self, model, function, verbose: bool = False):
        self.model = model
        self.function = function
        self.verbose = verbose

    def curvature_generator(self, layer_collection) -> CurvatureGenerator:
        check_same_dtype(layer_collection.parameters(self.model))
        return CurvatureGenerator(
            self.model,
            FunctionLoss(self.function),
            "hessian",
            layer_collection=layer_collection,
            progress=bool(self.verbose),
        )

    uses_jacobian_route = False
