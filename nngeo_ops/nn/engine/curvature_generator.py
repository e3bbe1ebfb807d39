"""The curvature generator: everything a representation needs to know to gather its statistics.

A :class:`CurvatureGenerator` binds a model, a layer collection, an output model and the kind of
curvature (``"exact"`` Fisher/GGN, ``"sample"`` Monte-Carlo Fisher, ``"empirical"`` Fisher or
``"hessian"``). Representations ask it for one pass over a loader (:meth:`run`), for the implicit
Jᵀ H J operator (:func:`~nngeo_ops.nn.pspace.implicit.implicit_curvature`) or for exact Hessians.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ArgumentTypeError, InvalidArgumentError, NonFiniteError, UnsupportedError
from ..data import ModelOnFirst, as_loader, progress_bar
from ..losses import OutputModel
from ..params import LayerCollection
from . import functional as fx
from .capture import Capture, batch_labels, prepare_batch, warn_train_mode
from .distributed import all_reduce_sum, reduce_counts, resolve_group
from .finite import nonfinite_layers, raise_nonfinite
from .precision import accumulation_dtype
from .structure import cached, first_parameter, frozen_state, walk

KINDS = ("exact", "sample", "empirical", "hessian")


def check_trainable(model, layer_collection=None, key=None) -> None:
    """A model with parameters to cover: not a frozen one (InvalidArgumentError naming the fix).
    ``key``: that of a :func:`~nngeo_ops.nn.engine.structure.walk` of ``model``, which says it."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layer_collection is not None:
        return
    if key is None:
        params = list(model.parameters())
        some, trainable = bool(params), any(p.requires_grad for p in params)
    else:
        some, trainable = frozen_state(key)
    if not some:
        raise InvalidArgumentError(
            f"the model ({type(model).__name__}) has no trainable parameter (no parameters at "
            "all): there is no curvature to compute; give the model whose parameters you study"
        )
    if not trainable:
        raise InvalidArgumentError(
            "the model is fully frozen (requires_grad=False on every parameter), so no parameter "
            "is covered: unfreeze the ones to cover with p.requires_grad_(True), or pass "
            "layer_collection=LayerCollection.from_modules(model, [...]) after unfreezing them"
        )


class CurvatureGenerator:
    """Model + loss + kind: what a representation (``PMatDense``, ``PMatKFAC``, ...) is built from.

    Usually made by the entry points of :mod:`nngeo_ops.nn.api` (``FIM``, ``GGN``, ...), which
    state the conventions: Fisher matrices are means over examples; GGN and Hessian follow the loss's
    reduction (``mean`` over the whole loader, or ``sum``).

    Args:
        model: the ``nn.Module``; its covered parameters fix the default device and the dtype of
            the statistics.
        output_model: the loss / likelihood on the outputs (see :mod:`nngeo_ops.nn.losses`).
        kind: ``"exact"`` (expectation over the model's labels), ``"sample"`` (Monte-Carlo labels),
            ``"empirical"`` (the data's labels) or ``"hessian"``.
        layer_collection: the covered parameters (default: every trainable parameter of
            ``model``); it fixes the flat order of every vector and matrix.
        function: ``function(*batch)`` computes the outputs (default ``model(batch[0])``).
        trials: Monte-Carlo labels drawn per example for ``kind="sample"``.
        generator: the ``torch.Generator`` of those draws (NNGeometry's name; ``rng`` is the same,
            the name used inside the library, where ``generator`` means a curvature generator).
        n_output: the expected number of outputs per example, checked when given.
        device: where the statistics are computed (default: that of the covered parameters).
        progress: a tqdm bar on the passes over the data: True shows it, False hides it, None
            shows it only on a terminal.
        kfac_mode: ``"expand"`` or ``"reduce"``, the KFAC form for weight sharing.
        process_group: the ``torch.distributed`` group whose shards are summed (see
            :mod:`nngeo_ops.nn.engine.distributed`).
    """

    def __init__(
        self,
        model: nn.Module,
        output_model: OutputModel,
        kind: str = "exact",
        layer_collection: LayerCollection | None = None,
        function=None,
        trials: int = 1,
        generator: torch.Generator | None = None,
        n_output: int | None = None,
        device=None,
        progress=None,
        kfac_mode: str = "expand",
        process_group=None,
        rng: torch.Generator | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kfac_mode not in ("expand", "reduce"):
            raise ValueError(f"kfac_mode must be 'expand' or 'reduce', not {kfac_mode!r}")
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            raise InvalidArgumentError(
                f"trials must be a positive integer (the labels drawn per example), got {trials!r}"
            )
        if generator is not None and rng is not None:
            raise ArgumentTypeError("give the torch.Generator once: generator= or rng=, not both")
        generator = rng if rng is not None else generator
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ArgumentTypeError(
                f"generator must be a torch.Generator, got {type(generator).__name__}: pass "
                "generator=torch.Generator().manual_seed(seed) (a seed alone is not accepted)"
            )
        if not isinstance(model, nn.Module):  # before it is walked (check_trainable's message)
            check_trainable(model)
        modules, key = walk(model, rules=False)  # one walk of the module tree (engine.structure)
        check_trainable(model, layer_collection, key)
        self.model = model
        self.output_model = output_model
        self.kind = kind
        self.layer_collection = layer_collection or cached(
            model, key, "layers", lambda: LayerCollection.from_model(model)
        )
        self.function = function if function is not None else ModelOnFirst(model)
        self.trials = trials
        self.rng = generator
        self.n_output = n_output
        self.progress = progress
        self.kfac_mode = kfac_mode
        first = first_parameter(model, modules, key, self.layer_collection)
        self.device = torch.device(device) if device is not None else first.device
        self.model_dtype = first.dtype
        self.dtype = accumulation_dtype(self.model_dtype)  # of the statistics and operators
        self._capture = None
        warn_train_mode(model, stacklevel=4, modules=modules)
        # data-parallel: each rank reads its shard, statistics are summed over the group
        self.process_group = resolve_group(process_group)

    @property
    def is_hessian(self) -> bool:
        """Whether the kind is ``"hessian"`` (the exact loss Hessian rather than a GGN / Fisher)."""
        return self.kind == "hessian"

    def capture(self) -> Capture:
        """The hook-based :class:`~nngeo_ops.nn.engine.capture.Capture` of this generator's model, output model
        and kind, created once and reused; raises :class:`~nngeo_ops.errors.UnsupportedError` for the
        Hessian, which has no hook-based representation.
        """
        if self.is_hessian:
            raise UnsupportedError("this representation is not available for the Hessian")
        if self._capture is None:
            self._capture = Capture(
                self.model,
                self.layer_collection,
                self.output_model,
                function=self.function,
                kind=self.kind,
                trials=self.trials,
                rng=self.rng,
                n_output=self.n_output,
                device=self.device,
                progress=self.progress,
                process_group=self.process_group,
            )
        return self._capture

    def run(self, examples, accumulators, desc="curvature"):
        """One pass over ``examples`` (a loader or a batch) feeding every accumulator; returns the
        normalisation scale of the pass (``1/N`` for a ``mean`` loss over ``N`` counted targets, 1 for
        ``sum``).
        """
        return self.capture().run(as_loader(examples), accumulators, desc=desc)

    # ------------------------------------------------------------------ function-space paths
    def _batches(self, examples, desc):
        for batch in progress_bar(as_loader(examples), self.progress, desc):
            yield prepare_batch(batch, self.device)

    def _finish(self, total, n_batches, reduced: bool = False):
        if (
            self.process_group is not None and not reduced
        ):  # counts over all shards (an empty shard is allowed)
            total, n_batches = reduce_counts(
                self.process_group, [total, n_batches], self.device, allow_empty=True
            )
        return self.output_model.scale(total, n_batches)

    def _sum_over_group(self, tensors, fm, sizes=None):
        """Sum symmetric matrices over the group; a rank with an empty shard sends zeros."""
        if tensors is None or (len(tensors) == 1 and not torch.is_tensor(tensors[0])):
            n = fm.flat0.numel()
            sizes = sizes or [n]
            tensors = [torch.zeros(k, k, dtype=self.dtype, device=self.device) for k in sizes]
        return all_reduce_sum(self.process_group, tensors, [True] * len(tensors))

    def flat_model(self) -> fx.FlatModel:
        """The model as a function of one flat parameter vector over the covered layers (layer-collection
        order).
        """
        return fx.FlatModel(self.model, self.layer_collection, self.function)

    # ------------------------------------------------------------------ exact Hessians
    def _loss(self, out, batch):
        y = batch_labels(batch)
        if not torch.isfinite(out).all():
            raise NonFiniteError("the model output contains NaN or inf")
        self.output_model.check_output(out, self.n_output)
        return self.output_model.loss(out, y)

    def hessian_dense(self, examples) -> torch.Tensor:
        """The exact loss Hessian ``∇²_θ L`` over the covered parameters, a dense ``(d, d)`` tensor in
        layer-collection order, summed over batches and normalised like the loss (``1/N`` for ``mean``,
        1 for ``sum``; summed over the process group when distributed). Raises
        :class:`~nngeo_ops.errors.NonFiniteError` naming the layers with NaN or inf.
        """
        fm, acc, total, nb = self.flat_model(), 0, 0, 0
        for batch in self._batches(examples, "hessian"):
            h, count = fx.hessian_dense(fm, batch, self._loss)
            acc, total, nb = acc + _symmetric_part(h.to(self.dtype)), total + count, nb + 1
        if self.process_group is not None:
            acc = self._sum_over_group([acc], fm)[0]
        out = acc * self._finish(total, nb)
        layers = nonfinite_layers(out, self.layer_collection)
        if layers != []:
            raise_nonfinite(layers, "the Hessian")
        return out

    def hessian_blocks(self, examples) -> dict[str, torch.Tensor]:
        """The per-layer diagonal blocks of the exact loss Hessian, ``{layer id: (d_l, d_l) tensor}``, with
        the normalisation of :meth:`hessian_dense`.
        """
        fm, total, nb = self.flat_model(), 0, 0
        slices = self.layer_collection.layer_slices()
        acc = None
        for batch in self._batches(examples, "hessian"):
            blocks, count = fx.hessian_blocks(fm, batch, self._loss, list(slices.values()))
            blocks = [_symmetric_part(b.to(self.dtype)) for b in blocks]
            acc = blocks if acc is None else [a + b for a, b in zip(acc, blocks)]
            total, nb = total + count, nb + 1
        if self.process_group is not None:
            acc = self._sum_over_group(acc, fm, [s.stop - s.start for s in slices.values()])
        scale = self._finish(total, nb)
        out = {lid: b * scale for lid, b in zip(slices, acc)}
        layers = nonfinite_layers(out, self.layer_collection)
        if layers != []:
            raise_nonfinite(layers, "the Hessian")
        return out


def _symmetric_part(h: torch.Tensor) -> torch.Tensor:
    # A forward-over-reverse Hessian is symmetric only to the model's round-off (about 1e-2 in
    # bfloat16), and the representations tag it symmetric: keep its symmetric part.
    return (h + h.mT) / 2
