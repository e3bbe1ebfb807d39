"""The curvature generator: everything a representation needs to know to gather its statistics.

A :class:`CurvatureGenerator` binds a model, a layer collection, an output model and the kind of
curvature (``"exact"`` Fisher/GGN, ``"sample"`` Monte-Carlo Fisher, ``"empirical"`` Fisher or
``"hessian"``). Representations ask it for one pass over a loader (:meth:`run`), for the implicit
Jᵀ H J operator (:meth:`implicit_op`) or for exact Hessians.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import NonFiniteError, UnsupportedError
from ..ops import MatFree
from . import functional as fx
from .capture import Capture, batch_labels, output_factor, prepare_batch
from .layercollection import LayerCollection
from .outputs import DataError, OutputModel

KINDS = ("exact", "sample", "empirical", "hessian")


class CurvatureGenerator:
    """Model + loss + kind. ``kfac_mode`` ('expand' or 'reduce') picks the KFAC weight-sharing form."""

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
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kfac_mode not in ("expand", "reduce"):
            raise ValueError(f"kfac_mode must be 'expand' or 'reduce', not {kfac_mode!r}")
        if trials < 1:
            raise ValueError(f"trials must be a positive integer, got {trials}")
        self.model = model
        self.output_model = output_model
        self.kind = kind
        self.layer_collection = layer_collection or LayerCollection.from_model(model)
        self.function = function if function is not None else (lambda *d: model(d[0]))
        self.trials = trials
        self.rng = generator
        self.n_output = n_output
        self.progress = progress
        self.kfac_mode = kfac_mode
        params = self.layer_collection.parameters(model)
        if not params:
            raise DataError("the layer collection covers no parameter")
        self.device = torch.device(device) if device is not None else params[0].device
        self.dtype = params[0].dtype
        self._capture = None

    @property
    def is_hessian(self) -> bool:
        return self.kind == "hessian"

    def capture(self) -> Capture:
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
                generator=self.rng,
                n_output=self.n_output,
                device=self.device,
                progress=self.progress,
            )
        return self._capture

    def run(self, examples, accumulators, desc="curvature"):
        return self.capture().run(examples, accumulators, desc=desc)

    # ------------------------------------------------------------------ function-space paths
    def _batches(self, examples, desc):
        disable = None if self.progress is None else not self.progress
        for batch in tqdm(examples, desc=desc, disable=disable, leave=False):
            yield prepare_batch(batch, self.device)

    def _finish(self, total, n_batches):
        if n_batches == 0:
            raise DataError("the loader yielded no examples")
        if self.output_model.reduction != "mean":
            return 1.0
        if total == 0:
            raise DataError("every target was ignored (ignore_index): the mean is undefined")
        return 1.0 / total

    def flat_model(self) -> fx.FlatModel:
        return fx.FlatModel(self.model, self.layer_collection, self.function)

    def implicit_op(self, examples, cache: bool = False) -> MatFree:
        """M as a batched ``MatFree`` node (see :class:`ImplicitProducts`)."""
        products = ImplicitProducts(self, examples, cache)
        n = self.layer_collection.numel()
        hess = self.kind == "hessian"
        op = MatFree(
            products.matmat,
            (n, n),
            dtype=self.dtype,
            device=self.device,
            symmetric=True,
            psd=not hess,
            batched=True,
            name="∇²L" if hess else "Jᵀ·H·J",
        )
        op.products = products
        return op

    # ------------------------------------------------------------------ exact Hessians
    def _loss(self, out, batch):
        y = batch_labels(batch)
        if not torch.isfinite(out).all():
            raise NonFiniteError("the model output contains NaN or inf")
        self.output_model.check_output(out, self.n_output)
        return self.output_model.loss(out, y)

    def hessian_dense(self, examples) -> torch.Tensor:
        fm, acc, total, nb = self.flat_model(), 0, 0, 0
        for batch in self._batches(examples, "hessian"):
            h, count = fx.hessian_dense(fm, batch, self._loss)
            acc, total, nb = acc + h, total + count, nb + 1
        return acc * self._finish(total, nb)

    def hessian_blocks(self, examples) -> dict[str, torch.Tensor]:
        fm, total, nb = self.flat_model(), 0, 0
        slices = self.layer_collection.layer_slices()
        acc = None
        for batch in self._batches(examples, "hessian"):
            blocks, count = fx.hessian_blocks(fm, batch, self._loss, list(slices.values()))
            acc = blocks if acc is None else [a + b for a, b in zip(acc, blocks)]
            total, nb = total + count, nb + 1
        scale = self._finish(total, nb)
        return {lid: b * scale for lid, b in zip(slices, acc)}


class ImplicitProducts:
    """The products of the implicit GGN / Fisher / Hessian of a generator over ``examples``.

    Without a cache each product makes one pass over ``examples`` (a forward pass carrying the
    tangent, then a backward pass, per batch). With ``cache=True`` the first product takes the
    batches once and linearises each (:class:`~nngeo_ops.nn.functional.Linearised`: its output, its
    reverse graph and the graph of Jᵀu, or the graph of the loss gradient for the Hessian); every
    later product is then two backward passes per batch over the kept graphs — the operator is
    applied many times by CG, Lanczos or Hutchinson, and this is where the time goes. The cache
    holds the activations of every batch (memory like keeping the whole loader's forward and
    backward graphs), is rebuilt when a covered parameter changes (in-place updates included) and
    is freed by :meth:`clear`.

    For the Monte-Carlo Fisher the labels are redrawn at each product from a generator re-seeded
    with the same seed (drawn once, with the cache), so the operator is fixed as long as the loader
    yields the same batches in the same order.
    """

    def __init__(self, gen: CurvatureGenerator, examples, cache: bool = False):
        self.gen, self.examples, self.cache = gen, examples, bool(cache)
        self._lin, self._key = None, None
        self.seed = None
        if gen.kind == "sample":
            self.seed = int(torch.randint(0, 2**62, (1,), generator=gen.rng).item())

    def clear(self) -> None:
        """Free the linearised batches (the next product rebuilds them)."""
        self._lin, self._key = None, None

    def _state_key(self):
        params = self.gen.layer_collection.parameters(self.gen.model)
        return tuple((p.data_ptr(), p._version) for p in params)

    def _factor(self, rng):
        gen = self.gen

        def factor(out, batch):
            y = batch_labels(batch)
            return output_factor(gen.output_model, gen.kind, out, y, gen.n_output, gen.trials, rng)

        return factor

    def _rng(self):
        return torch.Generator().manual_seed(self.seed) if self.seed is not None else None

    def _linearised(self):
        key = self._state_key()
        if self._lin is None or key != self._key:
            self._lin = None  # free the old graphs before building the new ones
            gen, fm, rng = self.gen, self.gen.flat_model(), self._rng()
            lin = []
            for batch in gen._batches(self.examples, "linearise"):
                if gen.kind == "hessian":
                    lin.append(fx.Linearised(fm, batch, loss=gen._loss))
                else:
                    lin.append(fx.Linearised(fm, batch, factor=self._factor(rng)))
            self._lin, self._key = lin, key
        return self._lin

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        gen = self.gen
        acc, total, nb = torch.zeros_like(v), 0, 0
        if self.cache:
            for lin in self._linearised():
                acc, total, nb = acc + lin.matmat(v), total + lin.count, nb + 1
            return acc * gen._finish(total, nb)
        fm, rng = gen.flat_model(), self._rng()
        for batch in gen._batches(self.examples, "implicit product"):
            if gen.kind == "hessian":
                hv, count = fx.hessian_matmat(fm, batch, gen._loss, v)
            else:
                hv, count = fx.ggn_matmat(fm, batch, self._factor(rng), v)
            acc, total, nb = acc + hv, total + count, nb + 1
        return acc * gen._finish(total, nb)
