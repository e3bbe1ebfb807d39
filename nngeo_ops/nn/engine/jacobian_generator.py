"""The Jacobian generator: model + function + parameters, and the per-example Jacobians of chunks.

It serves the :class:`~nngeo_ops.nn.fspace.jacobian.Jacobian` node (``to_torch``), the Gram matrices of
:mod:`nngeo_ops.nn.engine.ntk` and the PFMaps. Per-example Jacobians come from the hook engine of
:mod:`nngeo_ops.nn.engine.capture` (one forward and one backward with C batched cotangents per chunk, no
Python loop over examples), or from ``torch.func`` (a ``vmap`` of the single-example VJP over the
(example, output) pairs) for models the hooks cannot follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import vjp, vmap

from ...errors import (
    ArgumentTypeError,
    DataError,
    InvalidArgumentError,
    NNGeoError,
    UnsupportedError,
)
from ..data import (
    ModelOnFirst,
    as_loader,
    batch_size_of,
    check_same_outputs,
    flatten_outputs,
    progress_bar,
    split_batch,
)
from ..losses import Regression
from ..params import LayerCollection
from . import functional as fx
from .capture import Capture, prepare_batch, warn_train_mode
from .curvature_generator import check_trainable
from .distributed import resolve_group
from .functional import FlatModel
from .ntk import Features, kernel_tensor

BACKENDS = ("hooks", "func")


def resolve_layer_collection(model: nn.Module, layer_collection) -> LayerCollection:
    """The collection (all trainable parameters by default), checked against ``model``."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_trainable(model, layer_collection)
    lc = layer_collection if layer_collection is not None else LayerCollection.from_model(model)
    if not isinstance(lc, LayerCollection):
        raise ArgumentTypeError(
            f"layer_collection must be a LayerCollection, got {type(lc).__name__}"
        )
    if lc.numel() == 0:
        raise InvalidArgumentError(
            "the model has no trainable parameter (or the layer collection covers none): the "
            "Jacobian and the NTK are empty; give a model with parameters that require grad"
        )
    try:
        params = lc.parameters(model)
    except (NNGeoError, AttributeError) as err:
        raise InvalidArgumentError(
            f"the layer collection does not belong to this model ({err}); build it from the same "
            "model, e.g. LayerCollection.from_modules(model, [...])"
        ) from None
    own = {id(p) for p in model.parameters()}
    foreign = [n for n, p in zip(_param_names(lc), params) if id(p) not in own]
    if foreign:
        raise InvalidArgumentError(
            f"parameters {foreign} of the layer collection are not the model's"
        )
    frozen = [n for n, p in zip(_param_names(lc), params) if not p.requires_grad]
    if frozen:
        raise InvalidArgumentError(
            f"parameters {frozen} of the layer collection do not require grad; unfreeze them or "
            "leave them out of the collection"
        )
    return lc


def _param_names(lc: LayerCollection) -> list[str]:
    return [n for e in lc.layers.values() for n in e.param_names]


@dataclass
class JacobianPass:
    """One computation over chunks (a Jacobian, a kernel matrix, its diagonal): the backend, chosen
    at its first chunk (``None`` before), and the per-layer layout of the kernel features (layer id ->
    Kronecker rows rather than per-example gradients), decided at the first chunk too."""

    backend: str | None = None
    layout: dict[str, bool] = field(default_factory=dict)


def _structured_cheaper(r: int, da: int, dg: int, c: int) -> bool:
    """Whether the Gram of a Kronecker layer is cheaper from its rows than from per-example grads.

    Per pair of examples, the rows cost R²·(C²·(dG + 1) + dA) multiply-adds ((G Gᵀ) ⊙ (A Aᵀ) summed
    over position pairs) against C²·dG·dA for the inner products of materialised gradients. For one
    position (R = 1, dense layers) the rows win by a factor ~dA; for convolutions over many pixels
    the R² term loses.
    """
    return r * r * (c * c * (dg + 1) + da) < c * c * dg * da


class JacobianGenerator:
    """Model + function + layer collection: everything needed to build Jacobians and NTKs.

    Args:
        model: the network.
        function: ``function(*batch) -> outputs`` (batch first); default ``model(batch[0])``.
        layer_collection: the parameters θ (default: every trainable parameter of ``model``).
        chunk_size: examples processed at once when per-example Jacobians are materialised (Gram
            matrices, ``to_torch``) and in JVP/VJP passes; None keeps the loader's batches.
        device: where batches are moved (default: the device of the parameters).
        progress: show progress bars (None: only on a terminal).
        backend: ``"hooks"`` (per-example gradients from module hooks, Kronecker-structured Gram
            for dense layers; falls back to ``"func"`` when the hooks cannot follow a model) or
            ``"func"`` (torch.func alone: one ``vmap`` of the single-example VJP over the
            (example, output) pairs of a chunk).
    """

    def __init__(
        self,
        model: nn.Module,
        function=None,
        layer_collection: LayerCollection | None = None,
        chunk_size: int | None = None,
        device=None,
        progress=None,
        backend: str = "hooks",
        process_group=None,
    ):
        self.model = model
        # sharded data (see nngeo_ops.nn.engine.distributed): Gram matrices are gathered, J stays sharded
        self.process_group = resolve_group(process_group)
        self.layer_collection = resolve_layer_collection(model, layer_collection)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InvalidArgumentError(
                f"chunk_size must be a positive integer or None, got {chunk_size!r}"
            )
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.function = function if function is not None else ModelOnFirst(model)
        self.chunk_size = chunk_size
        self.progress = progress
        self.backend = backend
        params = self.layer_collection.parameters(model)
        self.dtype = params[0].dtype
        self.device = torch.device(device) if device is not None else params[0].device
        self._capture = None
        self._plan: dict[str, bool] | None = None
        warn_train_mode(model, stacklevel=4)

    # ------------------------------------------------------------------ data
    def chunks(self, examples, desc="examples"):
        """Yield the chunks of ``examples`` (one batch or a loader, see
        :func:`~nngeo_ops.nn.data.as_loader`; tuples, on ``self.device``)."""
        for batch in progress_bar(as_loader(examples), self.progress, desc):
            yield from split_batch(prepare_batch(batch, self.device), self.chunk_size)

    def flat_model(self) -> FlatModel:
        """The model as a function of one flat parameter vector over the covered layers, with its outputs
        flattened to ``(batch, C)``.
        """
        return FlatModel(self.model, self.layer_collection, self._flat_function)

    def _flat_function(self, *batch):
        return flatten_outputs(self.function(*batch))

    def current_flat(self) -> torch.Tensor:
        """The covered parameters of the model now, as one detached flat vector (layer-collection order)."""
        return self.layer_collection.flat_parameters(self.model)

    # ------------------------------------------------------------------ per-example Jacobians
    def _capture_engine(self) -> Capture:
        if self._capture is None:
            self._capture = Capture(
                self.model,
                self.layer_collection,
                Regression(),  # identity output factor: the K = C cotangents are the unit vectors
                function=self._flat_function,
                kind="exact",
                device=self.device,
                progress=False,
            )
        return self._capture

    def start(self) -> JacobianPass:
        """A new computation over chunks: its backend is chosen at its first chunk, then fixed."""
        run = JacobianPass()
        self._plan = run.layout  # the layout of the latest computation, for inspection
        return run

    def _hook_context(self, chunk, run: JacobianPass):
        """The capture engine's batch context of ``chunk``, or None on the func backend.

        The backend of ``run`` is chosen here, once, at its first chunk: the hooks unless the
        generator was built with ``backend="func"`` or they cannot follow the model (e.g. a
        parameterised module returning a tuple), which is then remembered in ``self.backend`` so that
        later computations go straight to torch.func. Nothing is computed before the choice, so
        nothing is redone; a later chunk the hooks cannot follow is an error naming the fix.
        """
        if run.backend is None:
            run.backend = self.backend
            if run.backend == "hooks":
                try:
                    return self._capture_engine().process(chunk)
                except UnsupportedError:
                    run.backend = self.backend = "func"
            return None
        if run.backend == "func":
            return None
        try:
            return self._capture_engine().process(chunk)
        except UnsupportedError as err:
            raise UnsupportedError(
                f"{err} (the module hooks followed the first chunk of this computation but not a "
                "later one; build the generator with backend='func')"
            ) from err

    def jacobian_chunk(self, chunk, run: JacobianPass | None = None) -> torch.Tensor:
        """The per-example Jacobian of one chunk, (C, B, P) in flat parameter order (``run``: the
        computation the chunk belongs to, see :meth:`start`; a computation of its own by default)."""
        ctx = self._hook_context(chunk, run if run is not None else JacobianPass())
        if ctx is None:
            return self._func_jacobian(chunk)
        pe = ctx.per_example_all()
        return pe.view(ctx.k, ctx.batch_size, -1)

    def _func_jacobian(self, chunk) -> torch.Tensor:
        """Per-example Jacobian of one chunk with torch.func alone: (C, B, P).

        One flat ``vmap`` over the B·C (example, output) pairs of the VJP of the single-example
        function, inputs repeated C times. The textbook nested ``vmap(jacrev(...))`` is avoided on
        purpose: nested batching rules of some backwards are missing or wrong (torch 2.13's
        ``prelu`` backward returns wrong numbers when the batch size equals the number of outputs).
        """
        fm = self.flat_model()
        b = batch_size_of(chunk)
        dims = tuple(
            0 if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == b else None for x in chunk
        )

        def one(w, *parts):
            parts = tuple(p.unsqueeze(0) if d == 0 else p for p, d in zip(parts, dims))
            return fm(w, parts)[0]

        with torch.no_grad():
            c = fm(fm.flat0, tuple(x[:1] if d == 0 else x for x, d in zip(chunk, dims))).shape[1]
        eye = torch.eye(c, dtype=fm.flat0.dtype, device=fm.flat0.device)
        rep = tuple(x.repeat_interleave(c, dim=0) if d == 0 else x for x, d in zip(chunk, dims))

        def row(w, e, *parts):
            return vjp(lambda w_: one(w_, *parts), w)[1](e)[0]

        try:
            jac = vmap(row, in_dims=(None, 0, *dims))(fm.flat0, eye.repeat(b, 1), *rep)
            jac = jac.view(b, c, -1)  # row n·C + c of the flat vmap is (example n, output c)
        except (RuntimeError, NotImplementedError):
            # no batching rule (a recurrent kernel, a custom autograd.Function): one example at
            # a time with plain autograd, the C cotangents batched
            jac = torch.stack(
                [
                    fx.vjp_by_autograd(fm, one_ex, eye[:, None, :])
                    for one_ex in split_batch(chunk, 1)
                ]
            )
        if fm.tangent_mask is not None:
            jac = jac * fm.tangent_mask
        return jac.permute(1, 0, 2)

    def features(self, chunk, run: JacobianPass) -> Features:
        """Per-layer Gram ingredients of one chunk of the computation ``run`` (see
        :class:`~nngeo_ops.nn.engine.ntk.Features`); the layout of each layer is decided at the
        first chunk, so that every chunk of ``run`` has the same."""
        ctx = self._hook_context(chunk, run)
        if ctx is None:
            jac = self._func_jacobian(chunk)
            return Features(b=jac.shape[1], c=jac.shape[0], grads=jac)
        cap, c, b = self._capture_engine(), ctx.k, ctx.batch_size
        feats = Features(b=b, c=c)
        dense = []
        for lid in self.layer_collection.layers:
            if not ctx.is_kron(lid):
                dense.append(ctx.per_example(lid).view(c, b, -1))
                continue
            arow, grow = ctx.kron_rows(lid)
            if lid not in run.layout:  # decided once, so that every chunk has the same layout
                run.layout[lid] = _structured_cheaper(
                    arow.shape[1], arow.shape[2], grow.shape[3], c
                )
            if run.layout[lid]:
                feats.krons.append((arow, grow))
            else:
                # Σ_r g_r ⊗ a_r; for order "ag" rules this is the transpose of the weight gradient,
                # which has the same inner products
                dense.append(torch.einsum("kbrg,bra->kbga", grow, arow).reshape(c, b, -1))
            user = cap.structured[lid]
            entry = self.layer_collection.layers[lid]
            if entry.has_bias() and not (user.rule.order == "ga" and user.rule.bias_in_kron):
                dense.append(ctx.separate_bias(lid).view(c, b, -1))
        if dense:
            feats.grads = torch.cat(dense, dim=2) if len(dense) > 1 else dense[0]
        return feats

    # ------------------------------------------------------------------ NNGeometry-style getters
    def get_jacobian(self, examples) -> torch.Tensor:
        """The dense Jacobian of ``examples``, shape [C, N, P]."""
        run = self.start()
        parts = [self.jacobian_chunk(ch, run) for ch in self.chunks(examples, "jacobian")]
        if not parts:
            raise DataError("the loader yielded no examples")
        check_same_outputs([p.shape[0] for p in parts])
        return torch.cat(parts, dim=1)

    def get_gram_matrix(self, examples) -> torch.Tensor:
        """The NTK ``K = J Jᵀ`` of ``examples`` as a dense ``[C, N, C, N]`` tensor (summed over a process
        group when distributed).
        """
        return kernel_tensor(self, examples)
