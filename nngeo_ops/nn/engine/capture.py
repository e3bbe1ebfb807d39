"""The capture engine: one forward and one batched backward per batch, statistics per layer.

For each batch the engine

1. runs the forward pass with forward hooks on every module that owns a covered parameter, recording
   the inputs of each call and the gradient edge of its output (a module called several times
   records each call);
2. asks the output model for the K output-space vectors L (exact factor, Monte-Carlo samples or the
   empirical gradient), shape ``(K, B, *out_shape)``;
3. back-propagates the K vectors at once, ``torch.autograd.grad(out, recorded_edges, L,
   is_grads_batched=True)``, which yields the cotangent of every recorded output for every column
   (or, where the columns go one at a time, hands each layer's cotangent to the accumulators as the
   backward produces it: :mod:`~nngeo_ops.nn.engine.streaming`);
4. hands a :class:`BatchContext` to the accumulators, which ask it lazily for per-example gradients,
   squared sums or Kronecker rows of the layers they need (computed once per batch and cached).

The outputs are differentiated at their *gradient edges* (``torch.autograd.graph.get_gradient_edge``:
the node that produced them), not held as tensors: the forward then keeps only what the graph keeps
(a plain forward frees a convolution's output once the activation has read it; holding it as a
target cost 12 MB for the benchmark CNN), and an in-place operation applied to an output afterwards
(``ReLU(inplace=True)``) does not change the cotangent taken, which is that of the value the module
returned.

No step loops over examples. Per-example quantities are "per (column, example)": the curvature is
(1/N) Σ_{k,n} ∇θ_{k,n} ∇θ_{k,n}ᵀ with ∇θ_{k,n} = J_nᵀ L_n[:, k].

Models are assumed to treat examples independently: BatchNorm in training mode couples them (a warning
is emitted), and the hooks then measure a different quantity than the per-example Jacobians.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ...errors import NonFiniteError, UnsupportedError
from ..data import ModelOnFirst, progress_bar
from ..layers.base import KronRule
from ..layers.generic import generic_per_example
from ..layers.registry import rule_for
from ..losses import DataError, OutputModel, apply_factor
from ..params import LayerCollection
from .finite import all_finite, check_statistics
from .precision import accumulation_dtype
from .streaming import stream_columns
from .structure import cached, first_parameter, walk

# modules whose backward the (legacy) vmap of ``is_grads_batched`` batches natively
_BATCHED_BACKWARD = (
    nn.Sequential,
    nn.Linear,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
)


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    output: torch.Tensor | None  # held by StepStatistics only; Capture.process keeps ``edge``
    version: int
    grad: torch.Tensor | None = None
    index: int | None = None  # which element of a tuple output is followed (see _hook)
    edge: object | None = None  # GradientEdge of the output (None: it does not require grad)
    shape: tuple = ()  # the output's shape (for the zero cotangent of an output not reached)


@dataclass
class _User:
    """A module that owns some covered parameters (its own, or shared with another module)."""

    name: str
    module: nn.Module
    attrs: tuple[str, ...]  # covered direct parameters, in the module's order
    keys: tuple[tuple[str, int], ...]  # (layer_id, index of the parameter inside the layer)
    rule: object | None
    calls: list = field(default_factory=list)

    def __getstate__(self):
        # the calls of the last batch are transient (its inputs and the gradient edges of its
        # outputs, which no pickle can hold): a pickled generator starts without them
        state = {k: v for k, v in self.__dict__.items() if k != "raw"}
        return {**state, "calls": []}


def warn_train_mode(model: nn.Module, stacklevel: int = 3, modules=None) -> None:
    """Warn about modules whose training mode makes per-example curvature ill-defined or random.

    BatchNorm in training mode couples the examples of a batch through its statistics; Dropout (and
    its variants) in training mode draws a new mask at every pass, so two products of an implicit
    operator, or two passes of one computation, see different networks. Both: ``model.eval()``.
    ``modules``: ``model.named_modules()`` when the caller has them already.
    """
    bn, drop = [], []
    for n, m in model.named_modules() if modules is None else modules:
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bn.append(n)
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            drop.append(n)
    parts = []
    if bn:
        parts.append(
            f"BatchNorm modules {bn} are in training mode: examples are coupled through batch "
            "statistics, so per-example Jacobians are not defined"
        )
    if drop:
        parts.append(
            f"Dropout modules {drop} are in training mode: each pass draws a new mask, so the "
            "curvature is random and the products of an implicit operator differ from call to call"
        )
    if parts:
        warnings.warn("; ".join(parts) + "; call model.eval()", stacklevel=stacklevel)


def _as_tuple(batch):
    if torch.is_tensor(batch) or isinstance(batch, Mapping):
        return (batch,)
    if isinstance(batch, list | tuple):
        return tuple(batch)
    raise UnsupportedError(
        f"batches of type {type(batch).__name__} are not understood; yield (inputs, labels) "
        "tuples or dicts, and pass function=..."
    )


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def prepare_batch(batch, device) -> tuple:
    """A batch as a tuple of its parts, tensors (also inside dicts) moved to ``device``.

    A dict batch (as tokenisers produce) becomes a 1-tuple: ``function(batch_dict)`` selects the
    inputs, and its ``"labels"`` entry, if any, is the target (see :func:`batch_labels`).
    """
    return tuple(_to(x, device) for x in _as_tuple(batch))


def batch_labels(batch: tuple):
    """The targets of a prepared batch: its second part, or a dict batch's ``"labels"``."""
    if len(batch) > 1:
        return batch[1]
    if isinstance(batch[0], Mapping):
        return batch[0].get("labels")
    return None


def _check_model_output(om: OutputModel, out, n_output) -> None:
    if not torch.is_tensor(out):
        raise UnsupportedError(f"the model returned {type(out).__name__}; use function=...")
    if not all_finite(out):
        raise NonFiniteError("the model output contains NaN or inf")
    om.check_output(out, n_output)


def output_hessian(om: OutputModel, kind, out, y, n_output=None, trials=1, rng=None):
    """Check the model output and return ``(h, count)``, ``h(u) = L Lᵀ u`` for the output model's
    factor of ``kind`` and ``u`` of shape (k, *out.shape): for ``"exact"`` the output model's
    closed form (:meth:`~nngeo_ops.nn.losses.OutputModel.exact_hessian`, no factor formed), else
    the factor of :func:`output_factor`, formed (Monte-Carlo labels drawn) once."""
    if kind == "exact":
        _check_model_output(om, out, n_output)
        return om.exact_hessian(out, y)
    lmat, count = output_factor(om, kind, out, y, n_output, trials, rng)
    return (lambda u: apply_factor(lmat, u.to(lmat.dtype))), count


def output_factor(om: OutputModel, kind, out, y, n_output=None, trials=1, rng=None):
    """Check the model output and return the output model's factor ``(L, count)`` for ``kind``."""
    _check_model_output(om, out, n_output)
    if kind == "exact":
        return om.exact(out, y)
    if kind == "sample":
        return om.sample(out, y, trials, rng)
    if kind == "empirical":
        return om.empirical(out, y)
    raise ValueError(f"unknown kind {kind!r}")


def _differentiable(o) -> bool:
    """A tensor that requires grad, or a (nested) tuple holding one (an LSTM's ``(h, c)``)."""
    if torch.is_tensor(o):
        return o.requires_grad
    return isinstance(o, tuple | list) and any(_differentiable(x) for x in o)


def _followed_output(user, module, output) -> tuple[int | None, torch.Tensor]:
    """The output tensor whose cotangents are taken: the output itself, or the one differentiable
    tensor of a tuple output (``nn.MultiheadAttention`` returns ``(out, None)`` with
    ``need_weights=False``). Several differentiable outputs cannot be followed by one cotangent."""
    if torch.is_tensor(output):
        return None, output
    name = f"module {user.name or '<root>'} ({type(module).__name__})"
    if isinstance(output, tuple | list):
        live = [i for i, o in enumerate(output) if _differentiable(o)]
        if len(live) == 1:
            return live[0], output[live[0]]
        raise UnsupportedError(
            f"{name} returns a tuple with {len(live)} differentiable tensors; only one can be "
            "followed (for nn.MultiheadAttention pass need_weights=False), or use PMatImplicit"
        )
    raise UnsupportedError(
        f"{name} returns {type(output).__name__}; modules owning parameters must return a tensor "
        "or a tuple with one differentiable tensor"
    )


class Capture:
    """Hook-based statistics of ``model`` over a loader for one output model.

    ``kind`` is ``"exact"``, ``"sample"`` (Monte-Carlo, ``trials`` draws from the ``torch.Generator`` ``rng``) or
    ``"empirical"``. ``function(*batch)`` computes the outputs (default ``model(batch[0])``).
    """

    def __init__(
        self,
        model: nn.Module,
        layer_collection: LayerCollection,
        output_model: OutputModel,
        function=None,
        kind: str = "exact",
        trials: int = 1,
        rng=None,
        n_output=None,
        device=None,
        progress=None,
        process_group=None,
    ):
        self.model = model
        self.lc = layer_collection
        # an already resolved group (see nngeo_ops.nn.engine.distributed.resolve_group), or None: local
        self.process_group = process_group
        self.output_model = output_model
        self.function = function if function is not None else ModelOnFirst(model)
        self.kind = kind
        self.trials = trials
        self.rng = rng
        self.n_output = n_output
        self.progress = progress
        modules, key = walk(model, rules=True)  # the model as it is now (see engine.structure)
        first = first_parameter(model, modules, key, self.lc)
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = accumulation_dtype(first.dtype)  # float32 for a half-precision model
        self._recording = False
        # record gradient edges (Capture.process), not the output tensors (StepStatistics)
        self._by_edge = False
        self._taps = None  # tensor hooks of a streamed batch (see _forward)
        self._sink = None  # where those hooks send a cotangent during a streamed backward
        plan = cached(model, key, ("capture", self.lc), lambda: self._plan(modules))
        users = [(name, ref(), *rest) for name, ref, *rest in plan[0]]
        if any(u[1] is None for u in users):  # a module died and another took its address
            plan = self._plan(modules)
            users = [(name, ref(), *rest) for name, ref, *rest in plan[0]]
        self.users: list[_User] = [_User(*u) for u in users]
        self.structured: dict[str, _User] = {lid: self.users[i] for lid, i in plan[1].items()}
        self._batched_backward = plan[2]

    # ------------------------------------------------------------------ structure
    def _plan(self, modules) -> tuple[list, dict, bool]:
        """What the capture of ``self.lc`` knows of the model before any batch: the owning modules
        ``[(name, weak reference to the module, attrs, keys, rule)]`` (see :meth:`_find_users`),
        ``{layer id: index of its structured owner}`` and whether one vmapped backward takes the K
        cotangents. Weak references: :func:`~nngeo_ops.nn.engine.structure.cached` keeps it."""
        self._find_users(self.lc.parameters(self.model), modules)
        index = {id(u): i for i, u in enumerate(self.users)}
        users = [(u.name, weakref.ref(u.module), u.attrs, u.keys, u.rule) for u in self.users]
        structured = {lid: index[id(u)] for lid, u in self.structured.items()}
        # the K cotangents go through one vmapped backward only where every module's backward has
        # a batching rule; elsewhere (convolutions, pooling...) the fallback is several times slower
        # than K plain backward passes over the retained graph
        batched = all(isinstance(m, _BATCHED_BACKWARD) for _, m in modules)
        return users, structured, batched

    def _find_users(self, params, modules):
        key_of = {}
        i = 0
        for lid, entry in self.lc.items():
            for j in range(len(entry.attrs)):
                key_of[id(params[i])] = (lid, j)
                i += 1
        self.users: list[_User] = []
        n_users = {}
        for name, mod in modules:
            attrs, keys = [], []
            for attr, p in mod._parameters.items():
                if p is not None and id(p) in key_of:
                    attrs.append(attr)
                    keys.append(key_of[id(p)])
                    n_users[id(p)] = n_users.get(id(p), 0) + 1
            if attrs and isinstance(mod, nn.RNNBase):
                # its hidden state is a second way out of the module that a hook on the output
                # sequence does not follow, and its per-example re-run has no vmap rule
                raise UnsupportedError(
                    f"module {name} ({type(mod).__name__}) is recurrent: the per-layer hooks of "
                    "PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank, PMatKFAC, PMatEKFAC and "
                    "PMatQuasiDiag cannot follow its hidden state. PMatImplicit works (exact "
                    "products by autograd / torch.func; then F.op.to_dense() for a small model), as "
                    "do Jacobian and GramMatrix; or leave the module out with a LayerCollection"
                )
            if attrs:
                rule = rule_for(mod)
                if rule is not None and not set(attrs) <= set(rule.attrs(mod)):
                    rule = None
                self.users.append(_User(name, mod, tuple(attrs), tuple(keys), rule))
        # a layer is structured when one module with a rule owns exactly its parameters alone
        of_layer = self.lc.get_layerid_module_map(self.model)
        self.structured: dict[str, _User] = {}
        for user in self.users:
            lid = user.keys[0][0]
            entry = self.lc.layers[lid]
            if (
                user.rule is not None
                and of_layer[lid] is user.module
                and user.attrs == entry.attrs
                and set(user.attrs) == set(user.rule.attrs(user.module))
                and all(n_users[id(getattr(user.module, a))] == 1 for a in user.attrs)
            ):
                self.structured[lid] = user

    def require_structured(self, what: str) -> None:
        """Raise UnsupportedError naming every layer that has no structured rule."""
        missing = [lid for lid in self.lc.layers if lid not in self.structured]
        if missing:
            kinds = ", ".join(f"{lid} ({self.lc.layers[lid].kind})" for lid in missing)
            own = [
                u.name
                for u in self.users
                if "forward" in u.module.__dict__ and any(k[0] in missing for k in u.keys)
            ]
            why = (
                f" ({', '.join(own)}: a forward of the instance's own replaces its kind's, whose "
                "closed form then no longer holds)"
                if own
                else ""
            )
            raise UnsupportedError(
                f"{what} needs a structured rule for every layer; none for: {kinds}{why}. Use "
                "PMatDense/PMatDiag/PMatBlockDiag/PMatImplicit, or exclude these layers with a "
                "LayerCollection"
            )

    # ------------------------------------------------------------------ hooks
    def register_hooks(self, user) -> list:
        """Install the recording hook on ``user``'s module; the handles.

        Where the module has forward hooks of the caller's, a first hook also notes the output as
        the module computed it: a later hook that returns another tensor or changes it in place
        would make the layer's statistics read the cotangent of that other value as the cotangent
        of its own output (a Linear's ``W a + b``), so the recording hook refuses it.
        """
        handles = []
        if user.module._forward_hooks:
            handles.append(user.module.register_forward_hook(self._raw_hook(user), prepend=True))
        handles.append(user.module.register_forward_hook(self._hook(user), with_kwargs=True))
        return handles

    def _raw_hook(self, user):
        def hook(module, args, output):
            if self._recording:
                tensor = _followed_output(user, module, output)[1]
                user.raw = (tensor, tensor._version)

        return hook

    def _hook(self, user):
        def hook(module, args, kwargs, output):
            if not self._recording:
                return None
            index, tensor = _followed_output(user, module, output)
            raw = user.__dict__.pop("raw", None)
            if raw is not None and (raw[0] is not tensor or raw[1] != tensor._version):
                raise UnsupportedError(
                    f"a forward hook of module {user.name or '<root>'} ({type(module).__name__}) "
                    "replaced or modified its output; the layer's statistics need the cotangent "
                    "of the output the layer computes. Remove the hook while building the "
                    "curvature, make it return None without changing the output, or use "
                    "PMatImplicit"
                )
            # statistics are data, never part of a graph: inputs are kept detached
            if len(args) == 1 and isinstance(args[0], torch.Tensor):  # the common call, no loop
                args = (args[0].detach(),)
            else:
                args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            kwargs = (
                {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}
                if kwargs
                else {}
            )
            if not self._by_edge:  # StepStatistics: the tensor (its own hooks, a version check)
                user.calls.append(_Call(args, kwargs, tensor, tensor._version, index=index))
                return None
            edge = get_gradient_edge(tensor) if tensor.requires_grad else None
            call = _Call(args, kwargs, None, 0, index=index, edge=edge, shape=tuple(tensor.shape))
            user.calls.append(call)
            if self._taps is not None and edge is not None:
                # a tensor hook fires with the cotangent of the value returned here, also when an
                # in-place operation rewrites the tensor later (torch >= 2.0)
                self._taps.append(tensor.register_hook(functools.partial(self._tapped, call)))
            return None

        return hook

    def _tapped(self, call, g):
        if self._sink is not None:  # a backward of Capture.process, not another one of this graph
            self._sink(call, g)

    def _forward(self, batch, taps: bool = False):
        """The forward pass with the recording hooks; with ``taps``, a tensor hook on every recorded
        output (removed by the caller through ``self._taps``)."""
        for u in self.users:
            u.calls = []
        handles = [h for u in self.users for h in self.register_hooks(u)]
        self._recording, self._by_edge = True, True
        self._taps = [] if taps else None
        try:
            with torch.enable_grad():
                out = self.function(*batch)
        finally:
            self._recording, self._by_edge = False, False
            for h in handles:
                h.remove()
        return out

    # ------------------------------------------------------------------ one batch
    def _prepare(self, batch):
        return prepare_batch(batch, self.device)

    def _adopt_unused_calls(self) -> None:
        """Hand the parameters of a module that was never called to its nearest called ancestor.

        ``nn.MultiheadAttention`` applies ``out_proj.weight`` itself, without calling ``out_proj``:
        no hook of ``out_proj`` fires, so its parameters are taken by the generic path of the
        ancestor that uses them (re-run with ``functional_call`` on dotted names).
        """
        dormant = [u for u in self.users if not u.calls]
        for u in dormant:
            parents = [
                a
                for a in self.users
                if a.calls and a is not u and (a.name == "" or u.name.startswith(a.name + "."))
            ]
            if not parents:
                raise UnsupportedError(
                    f"module {u.name or '<root>'} ({type(u.module).__name__}) owns covered "
                    f"parameters {list(u.attrs)} but was never called in the forward pass, and no "
                    "enclosing module that was called can take them: they are either unused or "
                    "applied directly by another module, and per-layer hooks cannot attribute their "
                    "gradients. Leave them out (layer_collection=LayerCollection.from_modules(model, "
                    "[...])) or use a whole-model torch.func path (PMatImplicit, Jacobian, GramMatrix)"
                )
            parent = max(parents, key=lambda a: len(a.name))
            rel = u.name[len(parent.name) + 1 :] if parent.name else u.name
            parent.attrs = parent.attrs + tuple(f"{rel}.{a}" for a in u.attrs)
            parent.keys = parent.keys + u.keys
            parent.rule = None  # the ancestor now runs the generic per-example path
            for lid, _ in parent.keys:
                self.structured.pop(lid, None)
            self.users.remove(u)

    def process(self, batch, consume=None, known_scale: bool = False) -> BatchContext:
        """Forward and backward of one batch; the :class:`BatchContext` of its statistics.

        With ``consume`` (a function of a context), where the K columns are back-propagated one
        at a time (modules without a batched backward), each layer's cotangent of each column is
        handed to ``consume`` as the backward produces it (a context with ``k = 1``, ``column = j``
        and one active layer, :mod:`~nngeo_ops.nn.engine.streaming`) and dropped after: neither the
        ``(K, B, …)`` stack of every layer's output cotangents (126 MB for the benchmark CNN) nor one
        column of all of them (12.6 MB) is held. Elsewhere ``consume`` gets the whole context once.
        The returned context then carries the batch's size and count only.

        ``known_scale``: the batch is the whole pass (local), so its normalisation is known before
        the accumulators see it: the contexts carry it as :attr:`BatchContext.scale`.
        """
        batch = self._prepare(batch)
        stream = consume is not None and not self._batched_backward
        try:
            out = self._forward(batch, taps=stream)
            self._adopt_unused_calls()
            y = batch_labels(batch)
            lmat, count = output_factor(
                self.output_model, self.kind, out, y, self.n_output, self.trials, self.rng
            )
            calls = [c for u in self.users for c in u.calls]
            if not out.requires_grad:
                raise DataError("the output does not depend on any covered parameter")
            lmat = lmat.to(out.dtype)
            scale = self._known_scale(count, out.shape[0]) if known_scale else None
            if stream:
                context = functools.partial(BatchContext, scale=scale)
                return stream_columns(self, out, calls, lmat, count, consume, context)
            grads = self._backprop(out, calls, lmat)
        finally:
            self._remove_taps()
        for c, g in zip(calls, grads):
            c.grad = (
                g
                if g is not None
                else torch.zeros((lmat.shape[0], *c.shape), dtype=out.dtype, device=out.device)
            )
        b = out.shape[0]
        del out  # the graph is no longer needed
        if self.dtype != lmat.dtype:
            self._widen()
        ctx = BatchContext(self, b, lmat.shape[0], count, scale=scale)
        if consume is not None:
            consume(ctx)
        return ctx

    def _known_scale(self, count: int, n_examples: int) -> float | None:
        """The normalisation of a pass of this one batch (see :meth:`run`), or None where it is 1
        (nothing to fold in) or undefined (``run`` raises its error at the end of the pass)."""
        try:
            scale = self.output_model.scale(count, n_examples)
        except DataError:
            return None
        return None if scale == 1 else scale

    def _remove_taps(self) -> None:
        """Remove the tensor hooks of a streamed batch (also after an error half-way: a graph kept
        alive by a traceback must not call the accumulators again)."""
        taps, self._taps, self._sink = self._taps, None, None
        for h in taps or ():
            h.remove()

    def _widen(self) -> None:
        """Cast the cotangents and inputs that layer rules read to the accumulation dtype (see
        :mod:`~nngeo_ops.nn.engine.precision`); users on the generic path keep the model's precision,
        which their re-run needs, and their per-example gradients are cast afterwards."""
        for u in self.users:
            if u.rule is None:
                continue
            for c in u.calls:
                c.grad = c.grad.to(self.dtype)
                c.args = tuple(
                    a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a
                    for a in c.args
                )

    def _backprop(self, out, calls, lmat):
        """The K cotangents ``(K, *shape)`` of every call's output (None where it is not reached)."""
        live = [i for i, c in enumerate(calls) if c.edge is not None]
        edges = [calls[i].edge for i in live]
        res = [None] * len(calls)
        if not edges:
            return res
        if lmat.shape[0] == 1:  # one column (Monte-Carlo with one trial, empirical): no vmap
            col = torch.autograd.grad(out, edges, lmat[0], allow_unused=True)
            for i, g in zip(live, col):
                res[i] = None if g is None else g.unsqueeze(0)
            return res
        if self._batched_backward:
            try:  # the graph is kept in case an op fails half-way and the loop below must redo it
                col = torch.autograd.grad(
                    out, edges, lmat, is_grads_batched=True, allow_unused=True, retain_graph=True
                )
                for i, g in zip(live, col):
                    res[i] = g
                return res
            except RuntimeError:
                pass
        # one backward per column over the retained graph (K is small), into preallocated outputs
        for k, lk in enumerate(lmat):
            col = torch.autograd.grad(
                out, edges, lk, retain_graph=k < lmat.shape[0] - 1, allow_unused=True
            )
            for i, g in zip(live, col):
                if g is None:
                    continue
                if res[i] is None:  # reached in one column, reached in all (the graph decides)
                    res[i] = g.new_empty(lmat.shape[0], *g.shape)
                res[i][k] = g
        return res

    def run(self, loader, accumulators, desc="curvature"):
        """One pass over ``loader`` feeding every accumulator; returns the normalisation scale."""
        total, n_ex = 0, 0
        # accumulators that sum their cotangent statistics over the columns and read the inputs'
        # once per batch (``column_wise``) take the columns one at a time (see ``process``)
        stream = bool(accumulators) and all(getattr(a, "column_wise", False) for a in accumulators)
        # a local pass over a list of one batch knows its normalisation once that batch's counts
        # are known, before the accumulators see it (BatchContext.scale): DiagAcc folds it into
        # the small factor of each layer's contraction, not a pass over the whole diagonal here
        known = isinstance(loader, list | tuple) and len(loader) == 1
        known = known and self.process_group is None

        def consume(ctx):
            for acc in accumulators:
                acc.update(ctx)

        try:
            for batch in progress_bar(loader, self.progress, desc):
                if stream:
                    ctx = self.process(batch, consume, known_scale=known)
                else:
                    ctx = self.process(batch, known_scale=known)
                    consume(ctx)
                total += ctx.count
                n_ex += ctx.batch_size
        finally:
            # the last batch's calls hold its inputs and the gradient edges of its outputs, hence
            # its whole autograd graph: drop them with the pass (memory; a representation keeping
            # its generator must stay picklable)
            for u in self.users:
                u.calls = []
        if self.process_group is not None:  # every rank now holds the sums over all shards
            from .distributed import reduce_pass

            total, n_ex = reduce_pass(self.process_group, accumulators, total, n_ex)
        scale = self.output_model.scale(total, n_ex)
        for acc in accumulators:
            acc.finalize(scale)
        check_statistics(accumulators, self.lc)
        return scale


class BatchContext:
    """Lazy per-layer statistics of one batch; each quantity is computed once."""

    def __init__(
        self,
        cap: Capture,
        batch_size: int,
        k: int,
        count: int,
        column=None,
        columns=None,
        scale: float | None = None,
    ):
        self.cap = cap
        # the normalisation of the whole pass when this batch is all of it (Capture.run), else
        # None: an accumulator may fold it into what it adds now (then not scale at finalize)
        self.scale = scale
        self.batch_size = batch_size
        self.k = k
        self.count = count
        # None: the K columns at once; j: column j alone (k = 1) of ``columns``, streamed by
        # Capture.process, so that statistics of the inputs alone are taken at one column only
        self.column = column
        self.columns = columns
        # None: every layer; a layer id: only that layer's cotangents are there (streamed)
        self.layer = None
        self._pe, self._upe = {}, {}

    @property
    def m(self) -> int:
        return self.k * self.batch_size

    @property
    def first_column(self) -> bool:
        """Whether this context is the whole batch or the first of its streamed columns (EKFAC's
        refit projects the inputs there, once per batch; KFAC takes its input factor at the
        :attr:`last_column`)."""
        return self.column is None or self.column == 0

    @property
    def last_column(self) -> bool:
        """Whether no later column of this batch follows (what an accumulator keeps for the
        columns of a batch can go)."""
        return self.column is None or self.column == self.columns - 1

    def select(self, layer_ids):
        """The layers of ``layer_ids`` whose statistics this context carries: all of them, or,
        while the columns are streamed, the one layer whose cotangent has just arrived."""
        if self.layer is None:
            return layer_ids
        return [lid for lid in layer_ids if lid == self.layer]

    def _user_contributions(self, u: _User) -> dict:
        """{attr: (K, B, *shape)} of one owning module, summed over its calls (computed once)."""
        res = self._upe.get(id(u))
        if res is None:
            res = {}
            for c in u.calls:
                if u.rule is not None:
                    part = u.rule.per_example(u.module, c.args[0], c.grad)
                else:
                    part = generic_per_example(
                        u.module, u.attrs, c.args, c.kwargs, c.grad, index=c.index
                    )
                for attr in u.attrs:
                    res[attr] = res[attr] + part[attr] if attr in res else part[attr]
            self._upe[id(u)] = res
        return res

    def _layer_contributions(self, lid: str) -> dict:
        """{index: (K, B, *shape)} of one layer, summed over every call of every owning module.

        Only the modules owning a parameter of this layer are differentiated, so a layer with a
        closed form never pays for the per-example gradients of another one.
        """
        pe = self._pe.get(lid)
        if pe is None:
            pe = {}
            for u in self.cap.users:
                if not any(key[0] == lid for key in u.keys):
                    continue
                res = self._user_contributions(u)
                for attr, (klid, j) in zip(u.attrs, u.keys):
                    if klid == lid:
                        pe[j] = pe[j] + res[attr] if j in pe else res[attr]
            self._pe[lid] = pe
        return pe

    def per_example(self, lid: str) -> torch.Tensor:
        """(K·B, P_layer) per-(column, example) gradients of one layer, in flat order."""
        pe = self._layer_contributions(lid)
        entry = self.cap.lc.layers[lid]
        parts = []
        for j, shape in enumerate(entry.shapes):
            t = pe.get(j)
            if t is None:  # parameter not reached by the output
                t = torch.zeros(
                    (self.k, self.batch_size, *shape), dtype=self.cap.dtype, device=self.cap.device
                )
            parts.append(t.reshape(self.m, -1).to(self.cap.dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def per_example_all(self) -> torch.Tensor:
        return torch.cat([self.per_example(lid) for lid in self.cap.lc.layers], dim=1)

    def diag(
        self, lid: str, out: torch.Tensor | None = None, pieces=None, scale: float | None = None
    ) -> torch.Tensor:
        """Σ over the columns and examples of the squared gradients of one layer, ``(P_layer,)`` in
        flat order; written into ``out`` (a contiguous ``(P_layer,)`` tensor) when given, so that
        an accumulator holding the whole diagonal in one buffer copies nothing. ``pieces``: the
        views of ``out`` for the layer's parameters ``{attr: view}``, flat or shaped like the
        parameter, when the caller has them (else they are cut from ``out`` here). ``scale``: a
        factor the result is multiplied by (the pass's normalisation, :attr:`scale`), folded into
        the squared cotangents by the Kronecker rules' closed form."""
        user = self.cap.structured.get(lid)
        if user is not None and len(user.calls) == 1 and lid not in self._pe:
            call = user.calls[0]
            if out is None:
                pieces = None
            elif pieces is None:
                entry = self.cap.lc.layers[lid]
                pieces = dict(zip(entry.attrs, entry.views(out)))
            folds = scale is not None and type(user.rule).diag is KronRule.diag
            extra = {"scale": scale} if folds else {}
            d = user.rule.diag(user.module, call.args[0], call.grad, out=pieces, **extra)
            if d is not None:
                if pieces is None:
                    res = torch.cat([d[a].reshape(-1) for a in user.attrs])
                else:
                    for a in user.attrs:
                        if d[a] is not pieces[a]:  # a kind that does not write into ``out``
                            pieces[a].copy_(d[a].reshape(pieces[a].shape))
                    res = out
                return res if scale is None or folds else res.mul_(scale)
        d = self.per_example(lid).square().sum(0)
        if scale is not None:
            d = d.mul_(scale)
        return d if out is None else out.copy_(d)

    def kron_rows(self, lid: str):
        """(arow (B, R, dA), grow (K, B, R, dG)) of a structured Kronecker layer, all calls joined.

        For order "ga" with a bias, arow carries a trailing constant 1 (the bias column of A).
        """
        user = self.cap.structured[lid]
        rule = user.rule
        arows, grows = [], []
        for ar, gr in self.kron_calls(lid):
            if rule.order == "ga" and getattr(user.module, "bias", None) is not None:
                ar = torch.cat([ar, ar.new_ones(*ar.shape[:2], 1)], dim=2)
            arows.append(ar)
            grows.append(gr)
        if len(arows) == 1:
            return arows[0], grows[0]
        return torch.cat(arows, dim=1), torch.cat(grows, dim=2)

    def kron_calls(self, lid: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(arow (B, R, dA), grow (K, B, R, dG))] per call of a Kronecker layer, without the bias 1.

        The rows are views of what the hooks recorded (the rule's layout: for convolutions the
        feature axis is not the innermost one in memory), nothing is copied.
        """
        user = self.cap.structured[lid]
        return [user.rule.rows(user.module, c.args[0], c.grad) for c in user.calls]

    def token_counts(self, lid: str) -> torch.Tensor:
        user = self.cap.structured[lid]
        return sum(user.rule.diagonal_input_factor(user.module, c.args[0]) for c in user.calls)

    def separate_bias(self, lid: str) -> torch.Tensor:
        """(K·B, C) per-example bias gradient of a layer whose bias is outside its Kronecker form."""
        user = self.cap.structured[lid]
        total = sum(user.rule.bias_grad(user.module, c.grad, None) for c in user.calls)
        return total.reshape(self.m, -1)

    def is_kron(self, lid: str) -> bool:
        user = self.cap.structured.get(lid)
        return user is not None and user.rule.kronecker
