"""Curvature statistics from a training step's own forward and backward pass.

A separate pass over a batch (:meth:`CurvatureGenerator.run`) costs a forward and a backward on top
of the training step. :class:`StepStatistics` instead records what the accumulators of
:mod:`nngeo_ops.nn.engine.accumulators` need (the inputs of each covered layer and the cotangents of its output)
while the *training step itself* runs:

* ``kind="sample"`` (Monte-Carlo Fisher): when the model's forward returns, labels ŷ ~ p(y | x) are
  drawn from its outputs with the generator's ``torch.Generator`` and the columns
  L = ∇_f(−log p(ŷ | f)) are back-propagated once to the recorded layer outputs through the graph of
  that forward (kept for the training loss: ``retain_graph=True``; no parameter gradient is formed).
  One extra partial backward, no extra forward.
* ``kind="exact"``: the same with the K columns of the exact output factor (one backward each, e.g.
  K = number of classes).
* ``kind="empirical"``: the cotangents of the training loss's own backward are read by tensor hooks
  on the layer outputs. They are those of the *batch loss*; with ``loss_reduction="mean"`` they are
  multiplied by the batch size B to give the per-example gradients of −log p(y_n | f_n). This is the
  empirical Fisher only when the training loss is the mean (resp. sum) over the batch of the output
  model's negative log-likelihood (``F.cross_entropy`` for ``classif_logits``); it is available for
  the classification variants whose count is the batch size.

Normalisation is that of a pass over the batch: statistics are means over the B examples.

Usage (what :class:`~nngeo_ops.apps.Preconditioner` does)::

    stats = StepStatistics(generator)
    stats.arm()                                   # before the step's forward
    loss = F.cross_entropy(model(x), y); loss.backward()
    if stats.ready:                               # else stats.why_not says why
        accs = PMatKFAC.accumulators(generator)
        stats.feed(accs)                          # update + finalize, as one pass would
        stats.release()
        F = PMatKFAC(generator, data=PMatKFAC.data_from(generator, accs))

While armed, every forward of the model with gradients enabled replaces the previous record (so
the statistics are those of the last such forward before :meth:`feed`); forwards without gradients
(evaluation under ``torch.no_grad()``) are ignored.
"""

from __future__ import annotations

import torch

from ...errors import DataError, InvalidArgumentError, NNGeoError, ShapeError, UnsupportedError
from .capture import BatchContext, output_factor

EMPIRICAL_VARIANTS = ("classif_logits", "classif_logsoftmax", "classif_binary_logits")


class StepStatistics:
    """Hooks that turn a training step's forward/backward into one batch of curvature statistics.

    Args:
        generator: the :class:`~nngeo_ops.nn.CurvatureGenerator` (model, layer collection, output
            model, kind ``"exact"``, ``"sample"`` or ``"empirical"``, ``torch.Generator``).
        loss_reduction: ``"mean"`` or ``"sum"``, how the training loss reduces over the batch (read
            only for ``kind="empirical"``, whose per-example gradients are B × the batch loss's
            output cotangents for a mean).

    Attributes:
        ready: True once a forward (and, for the empirical kind, its backward) has been recorded.
        why_not: a sentence saying why :attr:`ready` is False.
        error: the library error raised while recording (NaN in the outputs, wrong output shape),
            re-raised by :meth:`feed`; None if none.
        batch_size: B of the recorded forward (None before).
    """

    def __init__(self, generator, loss_reduction: str = "mean"):
        if generator.kind not in ("exact", "sample", "empirical"):
            raise UnsupportedError(
                f"statistics from the training step exist for the Fisher kinds exact, sample and "
                f"empirical, not {generator.kind!r}"
            )
        if loss_reduction not in ("mean", "sum"):
            raise InvalidArgumentError(
                f"loss_reduction must be 'mean' or 'sum', not {loss_reduction!r}"
            )
        name = getattr(generator.output_model, "name", "")
        if generator.kind == "empirical" and name not in EMPIRICAL_VARIANTS:
            raise UnsupportedError(
                f"the empirical Fisher from the training step's backward is available for "
                f"{EMPIRICAL_VARIANTS}, not {name!r}; refresh from a separate pass over the batch"
            )
        self.generator = generator
        self.loss_reduction = loss_reduction
        self.cap = generator.capture()
        self._handles: list = []
        self._grad_handles: list = []
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self):
        self.batch_size = None
        self._k = None
        self._count = None
        self._recorded = False
        self._pending = 0  # empirical: layer outputs whose cotangent has not arrived yet
        self.error = None
        self.why_not = "no forward pass with gradients was recorded since arm()"

    @property
    def armed(self) -> bool:
        """Whether the hooks are installed (between :meth:`arm` and the removal of the hooks)."""
        return bool(self._handles)

    @property
    def ready(self) -> bool:
        """True once a forward (and, for the empirical kind, its backward) has been recorded with no error;
        :attr:`why_not` says why not otherwise.
        """
        return self._recorded and self._pending == 0 and self.why_not is None

    def arm(self) -> None:
        """Install the hooks: the next forward of the model (with gradients) is recorded."""
        self.release()
        cap = self.cap
        for u in cap.users:
            u.calls = []
            self._handles += cap.register_hooks(u)
        self._handles.append(self.generator.model.register_forward_pre_hook(self._pre))
        self._handles.append(self.generator.model.register_forward_hook(self._post))

    def release(self) -> None:
        """Remove every hook and drop what was recorded (graphs and statistics are freed)."""
        for h in self._handles + self._grad_handles:
            h.remove()
        self._handles, self._grad_handles = [], []
        for u in self.cap.users:
            u.calls = []
        self.cap._recording = False  # noqa: SLF001
        self._reset()

    # ------------------------------------------------------------------ hooks
    def _pre(self, module, args):
        if not torch.is_grad_enabled():
            return
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        for u in self.cap.users:
            u.calls = []
        self._reset()
        self.cap._recording = True  # noqa: SLF001

    def _post(self, module, args, out):
        if not self.cap._recording:  # noqa: SLF001  (a forward without gradients)
            return
        self.cap._recording = False  # noqa: SLF001
        try:
            self._record(out)
        except NNGeoError as err:
            # raised by feed(), not inside the user's forward: the step that uses the statistics
            # fails, and leaves the parameters unchanged
            self.error = err
            self.why_not = f"the recorded forward could not be used ({err})"

    def _record(self, out):
        calls = [c for u in self.cap.users for c in u.calls]
        if not torch.is_tensor(out) or not out.requires_grad:
            self.why_not = "the recorded forward returned no tensor that depends on the parameters"
            return
        dormant = [u.name or "<root>" for u in self.cap.users if not u.calls]
        if dormant:
            self.why_not = (
                f"modules {dormant} own covered parameters but were not called by the forward"
            )
            return
        if any(c.output._version != c.version for c in calls):
            self.why_not = (
                "an in-place operation (e.g. ReLU(inplace=True)) overwrote a layer output that "
                "the statistics differentiate at"
            )
            return
        self.batch_size = out.shape[0]
        gen = self.generator
        if gen.kind == "empirical":
            gen.output_model.check_output(out, gen.n_output)
            self._k, self._count = 1, out.shape[0]
            scale = float(out.shape[0]) if self.loss_reduction == "mean" else 1.0
            self._pending = len(calls)
            for c in calls:
                self._grad_handles.append(c.output.register_hook(self._grad_hook(c, scale)))
            self.why_not = None
            self._recorded = True
            return
        lmat, count = output_factor(
            gen.output_model, gen.kind, out, None, gen.n_output, gen.trials, gen.rng
        )
        lmat = lmat.to(out.dtype)
        targets = [c.output for c in calls]
        cols = []
        for lk in lmat:  # K backward passes over the graph the training loss still needs
            g = torch.autograd.grad(out, targets, lk, retain_graph=True, allow_unused=True)
            cols.append(g)
        for i, c in enumerate(calls):
            gs = [col[i] for col in cols]
            if any(g is None for g in gs):
                c.grad = torch.zeros(
                    (len(cols), *c.output.shape), dtype=out.dtype, device=out.device
                )
            else:
                c.grad = torch.stack(gs)
            c.output = None
        self._k, self._count = lmat.shape[0], count
        self.why_not = None
        self._recorded = True

    def _grad_hook(self, call, scale):
        def hook(g):
            call.grad = (g.detach() * scale).unsqueeze(0)
            call.output = None
            self._pending -= 1

        return hook

    # ------------------------------------------------------------------ results
    def check_batch(self, batch) -> None:
        """Raise ShapeError if ``batch`` (a tuple, its first part the inputs) has another number of
        examples than the recorded forward."""
        if batch is None or self.batch_size is None:
            return
        x = batch[0] if isinstance(batch, tuple | list) else batch
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] != self.batch_size:
            raise ShapeError(
                f"the batch has {x.shape[0]} examples but the forward pass recorded for the "
                f"curvature had {self.batch_size}; pass the training step's own batch"
            )

    def feed(self, accumulators) -> float:
        """Update and finalise ``accumulators`` with the recorded batch (as one pass over it would);
        may be called several times before :meth:`release`. Returns the normalisation scale."""
        if not self.ready:
            if self._recorded and self._pending:
                why = (
                    f"the backward of the training loss did not reach {self._pending} recorded "
                    "layer outputs (call loss.backward() before step())"
                )
            else:
                why = self.why_not
            if self.error is not None:
                raise self.error
            raise DataError(f"no statistics from the training step: {why}")
        ctx = BatchContext(self.cap, self.batch_size, self._k, self._count)
        for acc in accumulators:
            acc.update(ctx)
        count = self._count
        group = getattr(self.generator, "process_group", None)
        if group is not None:  # data-parallel step: statistics of every rank's batch
            from .distributed import reduce_pass

            count, _ = reduce_pass(group, accumulators, count, self.batch_size)
        scale = self.generator.output_model.scale(count, self.batch_size)
        for acc in accumulators:
            acc.finalize(scale)
        return scale
