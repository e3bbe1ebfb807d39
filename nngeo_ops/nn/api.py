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

import functools
import inspect

from ..errors import UnsupportedError
from .data import as_loader
from .engine.curvature_generator import CurvatureGenerator
from .losses import output_model_for_loss, output_model_for_variant
from .pspace.base import PMatBlockDiag, PMatDense, PMatDiag, PMatImplicit

_P = inspect.Parameter
# The options every entry point shares, in their order in each signature (declared once here).
SHARED_OPTIONS = (
    _P("n_output", _P.POSITIONAL_OR_KEYWORD, default=None),
    _P("function", _P.POSITIONAL_OR_KEYWORD, default=None),
    _P("layer_collection", _P.POSITIONAL_OR_KEYWORD, default=None),
    _P("device", _P.POSITIONAL_OR_KEYWORD, default=None),
    _P("progress", _P.POSITIONAL_OR_KEYWORD, default=None),
    _P("covariance", _P.POSITIONAL_OR_KEYWORD, default=None),
    _P("kfac_mode", _P.POSITIONAL_OR_KEYWORD, default="expand"),
    _P("max_batches", _P.POSITIONAL_OR_KEYWORD, default=None),
    _P("process_group", _P.POSITIONAL_OR_KEYWORD, default=None),
)
SHARED_DOC = """

    Shared options (the same in every entry point): ``n_output`` is checked against
    ``outputs.shape[1]``; ``function(*batch)`` replaces ``model(batch[0])``; ``layer_collection``
    selects the parameters (default: every trainable one); ``device`` is where batches go (default:
    the parameters' device); ``progress=False`` silences the progress bar (None: shown on a terminal
    only); ``covariance`` is the noise covariance of the ``regression`` variant (identity by default);
    ``kfac_mode`` (``"expand"`` or ``"reduce"``) the KFAC variant for weight sharing;
    ``max_batches`` bounds each pass; ``process_group`` as in the module docstring.
    """
_HEAD = ("model", "loader", "loss_fn", "representation")


def _binder(signature: inspect.Signature):
    """``bind(args, kwargs) -> {name: value}`` for every parameter of ``signature``, defaults
    filled in: what ``signature.bind(*args, **kwargs)`` followed by ``apply_defaults()`` gives
    (13 µs a call, a tenth of a one-example build), in a dict lookup per argument. Every parameter
    is positional-or-keyword (checked here), so a call binds when it has at most as many positional
    arguments as parameters, only keywords naming a parameter that no positional argument took,
    and every parameter without a default given; any other call goes to ``signature.bind``, for
    its TypeError."""
    params = list(signature.parameters.values())
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        raise TypeError("the fast binding takes positional-or-keyword parameters only")
    names = [p.name for p in params]
    known = set(names)
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    required = [p.name for p in params if p.default is inspect.Parameter.empty]

    def bind(args: tuple, kwargs: dict) -> dict:
        if len(args) <= len(names):
            given = dict(zip(names, args))
            if not any(k in given or k not in known for k in kwargs):
                given.update(kwargs)
                if all(n in given for n in required):
                    return {**defaults, **given}
        bound = signature.bind(*args, **kwargs)  # raises the TypeError of this call
        bound.apply_defaults()
        return bound.arguments

    return bind


def _entry_point(kind: str, omit: tuple[str, ...] = ()):
    """An entry point from its *head*: a function of the arguments that tell the entry points apart
    (``variant``, ``loss_fn``, the Monte-Carlo draws...) returning ``(output model, generator
    options)``. The public function takes ``model, loader[, loss_fn], representation``, the head's
    own arguments, then :data:`SHARED_OPTIONS` (less ``omit``, options that mean nothing to it)."""

    def decorate(head):
        own = list(inspect.signature(head).parameters.values())
        shared_names = {p.name for p in SHARED_OPTIONS}
        public = [p for p in own if p.name not in shared_names]
        public += [p for p in SHARED_OPTIONS if p.name not in omit]
        signature = inspect.Signature(public)
        head_args = [p.name for p in own]
        bind = _binder(signature)
        # the shared options handed to the generator as they are (names resolved once, here)
        passed = [
            p.name
            for p in SHARED_OPTIONS
            if p.name not in omit and p.name not in ("covariance", "max_batches")
        ]

        @functools.wraps(head)
        def entry(*args, **kwargs):
            given = bind(args, kwargs)
            om, options = head(**{name: given[name] for name in head_args})
            for name in passed:
                options[name] = given[name]
            loader = as_loader(given["loader"], max_batches=given["max_batches"])
            gen = CurvatureGenerator(given["model"], om, kind, **options)
            return given["representation"](generator=gen, examples=loader)

        entry.__signature__ = signature
        entry.__doc__ = (head.__doc__ or "").rstrip() + SHARED_DOC
        return entry

    return decorate


@_entry_point("exact")
def FIM(model, loader, representation, variant="classif_logits", covariance=None):
    """The Fisher information with the expectation over y | x in closed form.

    ``variant``: ``classif_logits`` (softmax of logits), ``classif_logsoftmax`` (outputs are
    log-probabilities), ``classif_binary_logits`` (sigmoid of each output), ``regression`` (Gaussian
    N(f, covariance), identity by default), ``segmentation_logits`` (per-pixel softmax over dim 1,
    summed over pixels).
    """
    return output_model_for_variant(variant, covariance), {}


@_entry_point("sample")
def FIM_MonteCarlo(
    model,
    loader,
    representation,
    variant="classif_logits",
    trials=1,
    generator=None,
    covariance=None,
):
    """The Fisher with ``trials`` labels per example drawn from the model (``generator``: the
    ``torch.Generator`` of the draws)."""
    return output_model_for_variant(variant, covariance), {"trials": trials, "rng": generator}


@_entry_point("empirical")
def EmpiricalFisher(model, loader, representation, variant="classif_logits", covariance=None):
    """(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ with ℓ_n = −log p(y_n | x_n) at the loader's labels."""
    return output_model_for_variant(variant, covariance), {}


@_entry_point("exact", omit=("covariance",))
def GGN(model, loader, loss_fn, representation):
    """The generalised Gauss-Newton Jᵀ (∇²_f loss) J of CrossEntropyLoss, NLLLoss, MSELoss or
    BCEWithLogitsLoss (see :mod:`nngeo_ops.nn.losses` for NLLLoss)."""
    return output_model_for_loss(loss_fn), {}


HESSIAN_REPRESENTATIONS = (PMatDense, PMatDiag, PMatBlockDiag, PMatImplicit)


@_entry_point("hessian", omit=("covariance", "kfac_mode"))
def Hessian(model, loader, loss_fn, representation):
    """The exact Hessian of the dataset loss: dense, diagonal, block-diagonal (torch.func.hessian per
    layer) or implicit (Hessian-vector products, forward over reverse)."""
    if getattr(representation, "func", representation) not in HESSIAN_REPRESENTATIONS:
        raise UnsupportedError(
            f"Hessian supports {[r.__name__ for r in HESSIAN_REPRESENTATIONS]}, not "
            f"{getattr(representation, '__name__', representation)}"
        )
    return output_model_for_loss(loss_fn), {}
