"""Entry points (NNGeometry-compatible): ``FIM``, ``FIM_MonteCarlo``, ``EmpiricalFisher``, ``GGN``,
``Hessian``.

Each builds a :class:`CurvatureGenerator` and returns ``representation(generator, examples=loader)``.
Conventions: Fisher matrices are means over examples, F = (1/N) Σ_n J_nᵀ F_n J_n; the GGN and the
Hessian are those of the dataset loss with the loss module's reduction (``mean``: divided by what torch
divides by — non-ignored targets for CE/NLL, elements for MSE/BCE — over the whole loader, not a mean
of batch means; ``sum``: not divided). Batches are ``(inputs, labels, ...)`` tuples or plain input
tensors; ``function(*batch)`` overrides ``model(batch[0])``.

``loader`` is a loader of batches or one batch, by the rule of :mod:`nngeo_ops.nn.data`: a tensor
or a tuple / list of tensors whose first dimensions agree is one minibatch (``FIM(model, (x, y),
...)``), anything else iterable a loader; what is neither raises. ``max_batches=k`` reads only the
first k batches of each pass (a streaming loader without ``__len__``).

``process_group``: inside an initialised ``torch.distributed`` group each rank passes its own shard
of the data and receives the matrix of the union of the shards (see
:mod:`nngeo_ops.nn.engine.distributed`); ``None`` uses the default group when there is one, ``False``
computes on the local shard only.
"""

from __future__ import annotations

from ..errors import UnsupportedError
from .data import as_loader
from .engine.curvature_generator import CurvatureGenerator
from .losses import output_model_for_loss, output_model_for_variant
from .pspace.base import PMatBlockDiag, PMatDense, PMatDiag, PMatImplicit


def _make(model, loader, representation, om, kind, max_batches=None, **kw):
    loader = as_loader(loader, max_batches=max_batches)
    gen = CurvatureGenerator(model, om, kind, **kw)
    return representation(generator=gen, examples=loader)


def FIM(
    model,
    loader,
    representation,
    variant="classif_logits",
    n_output=None,
    function=None,
    layer_collection=None,
    device=None,
    progress=None,
    covariance=None,
    kfac_mode="expand",
    max_batches=None,
    process_group=None,
):
    """The Fisher information with the expectation over y | x in closed form.

    ``variant``: ``classif_logits`` (softmax of logits), ``classif_logsoftmax`` (outputs are
    log-probabilities), ``classif_binary_logits`` (sigmoid of each output), ``regression`` (Gaussian
    N(f, covariance), identity by default), ``segmentation_logits`` (per-pixel softmax over dim 1,
    summed over pixels). ``n_output`` is checked against ``outputs.shape[1]``. ``progress=False``
    silences the progress bar (None: shown on a terminal only).
    """
    om = output_model_for_variant(variant, covariance)
    return _make(
        model,
        loader,
        representation,
        om,
        "exact",
        layer_collection=layer_collection,
        function=function,
        n_output=n_output,
        device=device,
        progress=progress,
        max_batches=max_batches,
        kfac_mode=kfac_mode,
        process_group=process_group,
    )


def FIM_MonteCarlo(
    model,
    loader,
    representation,
    variant="classif_logits",
    trials=1,
    generator=None,
    n_output=None,
    function=None,
    layer_collection=None,
    device=None,
    progress=None,
    covariance=None,
    kfac_mode="expand",
    max_batches=None,
    process_group=None,
):
    """The Fisher with ``trials`` labels per example drawn from the model (``torch.Generator``)."""
    om = output_model_for_variant(variant, covariance)
    return _make(
        model,
        loader,
        representation,
        om,
        "sample",
        layer_collection=layer_collection,
        function=function,
        n_output=n_output,
        device=device,
        progress=progress,
        max_batches=max_batches,
        trials=trials,
        generator=generator,
        kfac_mode=kfac_mode,
        process_group=process_group,
    )


def EmpiricalFisher(
    model,
    loader,
    representation,
    variant="classif_logits",
    n_output=None,
    function=None,
    layer_collection=None,
    device=None,
    progress=None,
    covariance=None,
    kfac_mode="expand",
    max_batches=None,
    process_group=None,
):
    """(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ with ℓ_n = −log p(y_n | x_n) at the loader's labels."""
    om = output_model_for_variant(variant, covariance)
    return _make(
        model,
        loader,
        representation,
        om,
        "empirical",
        layer_collection=layer_collection,
        function=function,
        n_output=n_output,
        device=device,
        progress=progress,
        max_batches=max_batches,
        kfac_mode=kfac_mode,
        process_group=process_group,
    )


def GGN(
    model,
    loader,
    loss_fn,
    representation,
    n_output=None,
    function=None,
    layer_collection=None,
    device=None,
    progress=None,
    kfac_mode="expand",
    max_batches=None,
    process_group=None,
):
    """The generalised Gauss-Newton Jᵀ (∇²_f loss) J of CrossEntropyLoss, NLLLoss, MSELoss or
    BCEWithLogitsLoss (see :mod:`nngeo_ops.nn.losses` for NLLLoss)."""
    om = output_model_for_loss(loss_fn)
    return _make(
        model,
        loader,
        representation,
        om,
        "exact",
        layer_collection=layer_collection,
        function=function,
        n_output=n_output,
        device=device,
        progress=progress,
        max_batches=max_batches,
        kfac_mode=kfac_mode,
        process_group=process_group,
    )


HESSIAN_REPRESENTATIONS = (PMatDense, PMatDiag, PMatBlockDiag, PMatImplicit)


def Hessian(
    model,
    loader,
    loss_fn,
    representation,
    n_output=None,
    function=None,
    layer_collection=None,
    device=None,
    progress=None,
    max_batches=None,
    process_group=None,
):
    """The exact Hessian of the dataset loss: dense, diagonal, block-diagonal (torch.func.hessian per
    layer) or implicit (Hessian-vector products, forward over reverse)."""
    if getattr(representation, "func", representation) not in HESSIAN_REPRESENTATIONS:
        raise UnsupportedError(
            f"Hessian supports {[r.__name__ for r in HESSIAN_REPRESENTATIONS]}, not "
            f"{getattr(representation, '__name__', representation)}"
        )
    om = output_model_for_loss(loss_fn)
    return _make(
        model,
        loader,
        representation,
        om,
        "hessian",
        layer_collection=layer_collection,
        function=function,
        n_output=n_output,
        device=device,
        progress=progress,
        max_batches=max_batches,
        process_group=process_group,
    )
