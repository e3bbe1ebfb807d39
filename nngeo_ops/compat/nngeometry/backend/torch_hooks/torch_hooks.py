"""NNGeometry's ``TorchHooksJacobianBackend``: a model and a function, turned into our generators.

NNGeometry's backend computes, for a representation over a layer collection, the second moment of
the Jacobian of ``function(*batch)`` (outputs flattened per example to C values):

    M = (1/N) Σ_n J_nᵀ J_n,        J_n = ∂ function(x_n) / ∂θ  of shape (C, P),

which is our Fisher of a Gaussian regression with identity covariance (``Regression()``,
kind ``"exact"``): the backend hands our :class:`~nngeo_ops.nn.CurvatureGenerator` to our
representations, and our :class:`~nngeo_ops.nn.JacobianGenerator` to Jacobians and Gram matrices.

``centering=True`` centres the per-example Jacobians over the examples first, giving the covariance
(1/N) Σ_n (J_n − J̄)ᵀ (J_n − J̄) = E[JᵀJ] − J̄ᵀJ̄. That route materialises J ([C, N, P]) and is
available for dense, diagonal, block-diagonal and low-rank matrices, Jacobians and Gram matrices;
KFAC-type representations raise ``NotImplementedError`` (as in NNGeometry).

Convolution switch: inside :func:`use_conv_impl_for_convs`, per-example gradients are taken from
``torch.func`` (a vmapped VJP through the convolution itself) and the matrices are formed from the
materialised Jacobian; inside :func:`use_unfold_impl_for_convs` (the default) they come from our hook
engine, whose convolution rule works on unfolded patches. Both are exact; the switch exists to compare
them, as NNGeometry's does.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
from torch import nn

from .....errors import MixedDTypeError, ModelStateError, UnsupportedError
from .....nn.engine.curvature_generator import CurvatureGenerator
from .....nn.engine.jacobian_generator import JacobianGenerator
from .....nn.losses import Regression

_CONV_IMPL = contextvars.ContextVar("nngeo_compat_conv_impl", default="unfold")


@contextlib.contextmanager
def use_unfold_impl_for_convs():
    """Per-example gradients of convolutions from unfolded patches (our hook engine; the default)."""
    token = _CONV_IMPL.set("unfold")
    try:
        yield
    finally:
        _CONV_IMPL.reset(token)


@contextlib.contextmanager
def use_conv_impl_for_convs():
    """Per-example gradients from ``torch.func`` VJPs through the convolutions themselves."""
    token = _CONV_IMPL.set("conv")
    try:
        yield
    finally:
        _CONV_IMPL.reset(token)


def check_same_dtype(params) -> None:
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise MixedDTypeError(
            f"the covered parameters have several dtypes {sorted(map(str, dtypes))}; convert the "
            "model to one dtype with model.to(dtype)"
        )


def check_eval_batchnorm(model) -> None:
    bn = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if bn:
        raise ModelStateError(
            f"BatchNorm modules {bn} are in training mode: the examples of a batch are coupled "
            "through its statistics, so per-example Jacobians are not defined; call model.eval()"
        )


class TorchHooksJacobianBackend:
    """``TorchHooksJacobianBackend(model, function=None, centering=False, verbose=False)``.

    ``function(*batch)`` gives the outputs (default ``model(batch[0])``); ``verbose`` shows progress
    bars. Representations, Jacobians and Gram matrices built with this backend get our generators
    through :meth:`curvature_generator` and :meth:`jacobian_generator`.
    """

    def __init__(self, model, function=None, centering: bool = False, verbose: bool = False):
        self.model = model
        self.function = function if function is not None else (lambda *d: model(d[0]))
        self.centering = bool(centering)
        self.verbose = verbose

    @property
    def progress(self):
        return bool(self.verbose)

    # ------------------------------------------------------------------ our generators
    def curvature_generator(self, layer_collection) -> CurvatureGenerator:
        """Our generator of M = (1/N) Σ_n J_nᵀ J_n over ``layer_collection``."""
        check_same_dtype(layer_collection.parameters(self.model))
        return CurvatureGenerator(
            self.model,
            Regression(),
            "exact",
            layer_collection=layer_collection,
            function=self.function,
            progress=self.progress,
        )

    def jacobian_generator(self, layer_collection) -> JacobianGenerator:
        check_same_dtype(layer_collection.parameters(self.model))
        check_eval_batchnorm(self.model)
        backend = "func" if _CONV_IMPL.get() == "conv" else "hooks"
        return JacobianGenerator(
            self.model, self.function, layer_collection, progress=self.progress, backend=backend
        )

    @property
    def uses_jacobian_route(self) -> bool:
        """True when matrices are formed from the materialised Jacobian (centering, conv impl)."""
        return self.centering or _CONV_IMPL.get() == "conv"

    # ------------------------------------------------------------------ NNGeometry's getters
    def get_jacobian(self, examples, layer_collection) -> torch.Tensor:
        """[C, N, P], centred over the N examples when ``centering``."""
        jac = self.jacobian_generator(layer_collection).get_jacobian(examples)
        if self.centering:
            jac = jac - jac.mean(dim=1, keepdim=True)
        return jac

    def get_gram_matrix(self, examples, layer_collection) -> torch.Tensor:
        """[C, N, C, N]: the Gram matrix of the (centred when ``centering``) Jacobian."""
        if not self.centering:
            return self.jacobian_generator(layer_collection).get_gram_matrix(examples)
        jac = self.get_jacobian(examples, layer_collection)
        c, n, _ = jac.shape
        flat = jac.reshape(c * n, -1)
        return (flat @ flat.T).view(c, n, c, n)

    def stats_from_jacobian(self, kind: str, examples, layer_collection):
        """The data of a representation computed from the materialised Jacobian J ([C, N, P]):
        ``dense`` JᵀJ/N, ``diag`` its diagonal, ``blockdiag`` its diagonal blocks by layer,
        ``lowrank`` the factor Jᵀ/√N (P × C·N)."""
        jac = self.get_jacobian(examples, layer_collection)
        c, n, p = jac.shape
        flat = jac.reshape(c * n, p)
        if kind == "dense":
            return flat.T @ flat / n
        if kind == "diag":
            return flat.square().sum(0) / n
        if kind == "blockdiag":
            out = {}
            for lid, sl in layer_collection.layer_slices().items():
                part = flat[:, sl]
                out[lid] = part.T @ part / n
            return out
        if kind == "lowrank":
            return flat.T.contiguous() / math.sqrt(n)
        raise UnsupportedError(
            f"{kind} matrices are not available with centering=True or the convolution "
            "implementation switch; use PMatDense, PMatDiag, PMatBlockDiag or PMatLowRank"
        )
