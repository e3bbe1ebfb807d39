"""NNGeometry's ``nngeometry.metrics``: ``FIM`` and ``FIM_MonteCarlo``, our entry points with
NNGeometry's signatures (``device`` and ``verbose`` accepted; ``verbose`` shows progress bars)."""

from __future__ import annotations

import torch

from ...nn import api as _m
from .backend.torch_hooks.torch_hooks import check_same_dtype
from .layercollection import LayerCollection


def _lc(model, layer_collection):
    lc = layer_collection if layer_collection is not None else LayerCollection.from_model(model)
    check_same_dtype(lc.parameters(model))  # NNGeometry raises ValueError on mixed dtypes
    return lc


def FIM(
    model,
    loader,
    representation,
    variant="classif_logits",
    device=None,
    function=None,
    layer_collection=None,
    verbose=False,
    **kwargs,
):
    """The Fisher with the expectation over y | x in closed form (mean over examples)."""
    return _m.FIM(
        model,
        loader,
        representation,
        variant=variant,
        function=function,
        layer_collection=_lc(model, layer_collection),
        progress=bool(verbose),
        **kwargs,
    )


def FIM_MonteCarlo(
    model,
    loader,
    representation,
    variant="classif_logits",
    trials=1,
    device=None,
    function=None,
    layer_collection=None,
    verbose=False,
    **kwargs,
):
    """The Fisher with ``trials`` labels per example drawn from the model.

    NNGeometry's ``variant="regression"`` with ``covariance=Σ`` draws y ~ N(f, Σ) and averages the
    outer products of Jᵀ(y − f), i.e. estimates Jᵀ Σ J (not the Fisher Jᵀ Σ⁻¹ J of N(f, Σ), which is
    what ``nngeo_ops.nn.FIM_MonteCarlo`` estimates): the compat layer keeps NNGeometry's meaning by
    handing Σ⁻¹ to ours.
    """
    if variant == "regression" and kwargs.get("covariance") is not None:
        kwargs["covariance"] = _inverse_covariance(kwargs["covariance"])
    return _m.FIM_MonteCarlo(
        model,
        loader,
        representation,
        variant=variant,
        trials=trials,
        function=function,
        layer_collection=_lc(model, layer_collection),
        progress=bool(verbose),
        **kwargs,
    )


def _inverse_covariance(cov):
    c = torch.as_tensor(cov).detach()
    if c.dim() <= 1:
        return 1.0 / c
    return torch.linalg.inv(c)
