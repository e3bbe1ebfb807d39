"""Per-example Jacobians of a model as operators: the map from parameter space to function space.

For a model f(x; θ) with C outputs per example (outputs of shape ``(B, *S)`` are flattened to
C = prod(S); a per-example scalar ``(B,)`` has C = 1) and a loader of N examples, the Jacobian is

    J[(c, n), p] = ∂f_c(x_n; θ) / ∂θ_p,        shape (C·N) × P,

with P = ``layer_collection.numel()`` in the collection's flat order (``model.named_parameters()``
restricted to the covered parameters) and **rows in output-major order, row = c·N + n**. This is
NNGeometry's layout: ``J.to_torch()`` has shape ``[C, N, P]`` and equals ``J.to_dense().view(C, N,
P)``; a function-space vector (:class:`FVector`) is stored ``(C, N)`` and flattens to the same
row order, and the Gram matrix J Jᵀ viewed ``[C, N, C, N]`` is NNGeometry's ``FMatDense`` layout.

Three ways to use J, none of which forms the (C·N) × P matrix unless asked:

* :class:`Jacobian` is an ``ops`` node (a batched :class:`~nngeo_ops.ops.MatFree`). ``J @ V`` is a
  forward-mode product (``torch.func.jvp``, vmapped over the columns of V, one pass over the
  loader), ``J.T @ U`` a reverse-mode product (one ``vjp`` per batch, vmapped over the columns of U).
  Composites stay lazy: ``J.T @ H @ J`` is an ops ``Product`` printed ``Jᵀ·H·J`` and tagged PSD when
  H is, ``J @ F.op @ J.T`` pushes a parameter-space matrix forward to function space.
* :class:`PFMapDense` / :class:`PFMapImplicit` are NNGeometry-style wrappers (``jvp`` takes a
  :class:`PVector` and returns an :class:`FVector`, ``vjp`` the converse) over a dense [C, N, P]
  tensor or over a :class:`Jacobian` node.
* :func:`mapTMmap` gives J F Jᵀ for a parameter-space matrix F (lazy, or reduced per example).

Materialising J (``to_torch()``, the Gram matrices of :mod:`nngeo_ops.nn.ntk`) uses batched
per-example gradients from the hook engine of :mod:`nngeo_ops.nn.capture` — one forward and one
backward with C batched cotangents per chunk of examples, no Python loop over examples — with a
``torch.func`` fallback (a ``vmap`` of the single-example VJP over the (example, output) pairs) for
models the hooks cannot follow.

The loader must yield the same examples in the same order at every pass (no shuffling): each product
re-reads it, and a cheap fingerprint of the inputs, taken when the node is built, is checked at every
pass so that a shuffled loader raises instead of silently permuting the rows. Likewise the model must
be deterministic (``model.eval()`` for dropout) and treat examples independently (BatchNorm in eval
mode) for per-example Jacobians to be defined.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import jvp, vjp, vmap
from tqdm.auto import tqdm

from ..errors import (
    ArgumentTypeError,
    DataError,
    InvalidArgumentError,
    NNGeoError,
    NonFiniteError,
    ShapeError,
    UnsupportedError,
)
from ..ops import Dense, LinearOperator, MatFree
from .capture import Capture, prepare_batch
from .functional import FlatModel
from .layercollection import LayerCollection
from .outputs import Regression
from .vector import FVector, PVector

# Columns of a block product pushed through one vmapped jvp / vjp at a time: bounds the memory of
# J @ V for wide V (e.g. to_dense() of a small implicit operator) to this many copies of the
# activations of one chunk of examples.
MAX_COLUMNS = 128

BACKENDS = ("hooks", "func")


class BackendSwitched(Exception):
    """Internal: the hooks failed on a chunk after earlier chunks used them; start over with func."""


# ---------------------------------------------------------------------- small helpers
def flatten_outputs(out) -> torch.Tensor:
    """Model outputs ``(B, *S)`` as ``(B, C)`` with C = prod(S) (C = 1 for per-example scalars)."""
    if not torch.is_tensor(out):
        raise UnsupportedError(
            f"the function returned {type(out).__name__}; it must return a tensor of outputs "
            "(batch first): pass function=lambda *batch: ... selecting it"
        )
    if out.dim() == 0:
        raise ShapeError(
            "the function returned a scalar; it must return per-example outputs of shape "
            "(batch, ...) — e.g. a loss with reduction='none'"
        )
    return out.reshape(out.shape[0], -1)


def _leaves(batch: tuple) -> list:
    """The parts of a batch, with dict batches (tokeniser output) opened in key order."""
    out = []
    for x in batch:
        if isinstance(x, Mapping):
            out.extend(x[k] for k in sorted(x))
        else:
            out.append(x)
    return out


def _batch_size(batch: tuple) -> int:
    for x in _leaves(batch):
        if torch.is_tensor(x) and x.dim() > 0:
            return x.shape[0]
    raise ArgumentTypeError("a batch must contain at least one tensor with a batch dimension")


def _slice(x, b: int, i: int, size: int):
    if isinstance(x, Mapping):
        return {k: _slice(v, b, i, size) for k, v in x.items()}
    return x[i : i + size] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == b else x


def split_batch(batch: tuple, chunk_size: int | None) -> list[tuple]:
    """Cut a batch into chunks of at most ``chunk_size`` examples (tensors sliced along dim 0).

    Parts that are not tensors with the batch size as first dimension are passed unchanged.
    """
    b = _batch_size(batch)
    if chunk_size is None or b <= chunk_size:
        return [batch]
    cuts = []
    for i in range(0, b, chunk_size):
        cuts.append(tuple(_slice(x, b, i, chunk_size) for x in batch))
    return cuts


def _fingerprint(batch: tuple, b: int) -> torch.Tensor:
    """A cheap per-example signature of a chunk's tensors (to detect a loader that reshuffles)."""
    sig = None
    for k, x in enumerate(_leaves(batch)):
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == b and not x.is_complex():
            flat = x.detach().reshape(b, -1).to(torch.float64)  # stays on its device
            g = torch.Generator().manual_seed(1000 + k)
            w = torch.rand(flat.shape[1], generator=g, dtype=torch.float64) + 0.5
            part = flat @ w.to(flat.device)
            sig = part if sig is None else sig + part
    return sig


def resolve_layer_collection(model: nn.Module, layer_collection) -> LayerCollection:
    """The collection (all trainable parameters by default), checked against ``model``."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
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


def _progress(iterable, progress, desc):
    disable = None if progress is None else not progress
    return tqdm(iterable, desc=desc, disable=disable, leave=False)


# ---------------------------------------------------------------------- per-chunk features
@dataclass
class Features:
    """What the Gram matrix needs from one chunk of B examples, for C outputs.

    ``grads``: per-example gradients (C, B, P_d) of the layers taken densely, concatenated (their
    order inside the row does not matter for inner products). ``krons``: for each layer taken in
    Kronecker form, ``(A, G)`` with A (B, R, dA) and G (C, B, R, dG) such that the per-example
    gradient is Σ_r G[c, n, r] ⊗ A[n, r] (see :mod:`nngeo_ops.nn.rules`).
    """

    b: int
    c: int
    grads: torch.Tensor | None = None
    krons: list = field(default_factory=list)


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
    ):
        self.model = model
        self.layer_collection = resolve_layer_collection(model, layer_collection)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InvalidArgumentError(
                f"chunk_size must be a positive integer or None, got {chunk_size!r}"
            )
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.function = function if function is not None else (lambda *d: model(d[0]))
        self.chunk_size = chunk_size
        self.progress = progress
        self.backend = backend
        params = self.layer_collection.parameters(model)
        self.dtype = params[0].dtype
        self.device = torch.device(device) if device is not None else params[0].device
        self._capture = None
        self._plan: dict[str, bool] | None = None
        self._hook_chunks = 0
        bn = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        ]
        if bn:
            warnings.warn(
                f"BatchNorm modules {bn} are in training mode: examples are coupled through batch "
                "statistics, so per-example Jacobians are not defined; call model.eval()",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ data
    def chunks(self, examples, desc="examples"):
        """Yield the chunks of ``examples`` (tuples, on ``self.device``)."""
        if torch.is_tensor(examples) or (
            isinstance(examples, tuple) and examples and torch.is_tensor(examples[0])
        ):
            examples = [examples]  # a single batch, as NNGeometry accepts
        for batch in _progress(examples, self.progress, desc):
            yield from split_batch(prepare_batch(batch, self.device), self.chunk_size)

    def flat_model(self) -> FlatModel:
        return FlatModel(self.model, self.layer_collection, self._flat_function)

    def _flat_function(self, *batch):
        return flatten_outputs(self.function(*batch))

    def current_flat(self) -> torch.Tensor:
        return torch.cat(
            [p.detach().reshape(-1) for p in self.layer_collection.parameters(self.model)]
        )

    def jacobian_op(self, examples, name: str = "J") -> Jacobian:
        """The :class:`Jacobian` node of ``examples``."""
        return Jacobian(generator=self, loader=examples, name=name)

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

    def _hook_context(self, chunk):
        """The capture engine's batch context, or None when the hooks cannot follow the model."""
        if self.backend != "hooks":
            return None
        try:
            return self._capture_engine().process(chunk)
        except UnsupportedError:
            self.backend = "func"  # e.g. a parameterised module returning a tuple
            return None

    def jacobian_chunk(self, chunk) -> torch.Tensor:
        """The per-example Jacobian of one chunk, (C, B, P) in flat parameter order."""
        ctx = self._hook_context(chunk)
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
        b = _batch_size(chunk)
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

        jac = vmap(row, in_dims=(None, 0, *dims))(fm.flat0, eye.repeat(b, 1), *rep)
        jac = jac.view(b, c, -1)  # row n·C + c of the flat vmap is (example n, output c)
        if fm.tangent_mask is not None:
            jac = jac * fm.tangent_mask
        return jac.permute(1, 0, 2)

    def features(self, chunk) -> Features:
        """Per-layer Gram ingredients of one chunk (see :class:`Features`)."""
        ctx = self._hook_context(chunk)
        if ctx is None:
            if self._hook_chunks:  # earlier chunks have another layout: the caller starts over
                self._hook_chunks = 0
                raise BackendSwitched
            jac = self._func_jacobian(chunk)
            return Features(b=jac.shape[1], c=jac.shape[0], grads=jac)
        self._hook_chunks += 1
        cap, c, b = self._capture_engine(), ctx.k, ctx.batch_size
        feats = Features(b=b, c=c)
        dense = []
        for lid in self.layer_collection.layers:
            if not ctx.is_kron(lid):
                dense.append(ctx.per_example(lid).view(c, b, -1))
                continue
            arow, grow = ctx.kron_rows(lid)
            if self._plan is None:
                self._plan = {}
            if lid not in self._plan:  # decided once, so that every chunk has the same layout
                self._plan[lid] = _structured_cheaper(
                    arow.shape[1], arow.shape[2], grow.shape[3], c
                )
            if self._plan[lid]:
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

    def reset_plan(self) -> None:
        """Forget the per-layer choices (call before a computation that combines chunks)."""
        self._plan = None
        self._hook_chunks = 0

    # ------------------------------------------------------------------ NNGeometry-style getters
    def get_jacobian(self, examples) -> torch.Tensor:
        """The dense Jacobian of ``examples``, shape [C, N, P]."""
        parts = [self.jacobian_chunk(ch) for ch in self.chunks(examples, "jacobian")]
        if not parts:
            raise DataError("the loader yielded no examples")
        _check_same_c([p.shape[0] for p in parts])
        return torch.cat(parts, dim=1)

    def get_gram_matrix(self, examples) -> torch.Tensor:
        from .ntk import gram_tensor

        return gram_tensor(self, examples)


def _check_same_c(cs):
    if any(c != cs[0] for c in cs):
        raise ShapeError(
            f"the function returned different numbers of outputs per batch: {sorted(set(cs))}"
        )


# ---------------------------------------------------------------------- the Jacobian node
class Jacobian(MatFree):
    """The per-example Jacobian of ``function`` over ``loader`` as an ops node, (C·N) × P.

    Rows are output-major (row = c·N + n, NNGeometry's [C, N, P] flattened); columns follow the
    layer collection. Products never form J:

    * ``J @ V`` (V of shape (P,) or (P, k)): J V by forward mode, ``torch.func.jvp`` vmapped over
      the k columns, one pass over the loader;
    * ``J.T @ U`` (U of shape (C·N,) or (C·N, k)): Jᵀ U by reverse mode, one ``vjp`` per batch
      vmapped over the columns;
    * ``J @ PVector`` returns an :class:`FVector` (C, N); :meth:`vjp` maps an FVector back to a
      PVector.

    The operator is the Jacobian **at the parameters of construction** (a copy is kept): products
    are unaffected by later updates of the model; :meth:`to_torch` checks that the model still has
    these parameters.

    Args:
        model, loader: the network and the examples (re-read at each product; see the module
            docstring on ordering).
        function: ``function(*batch) -> outputs`` (default ``model(batch[0])``), any function of
            the model, e.g. a per-example loss ``(B,)``.
        layer_collection: the parameters θ (default all trainable ones).
        chunk_size: at most this many examples per forward pass (None: the loader's batches).
        device, progress, backend: see :class:`JacobianGenerator`.
        generator: an existing :class:`JacobianGenerator` instead of model/function/... .
        name: how the node prints (``J``).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        loader=None,
        function=None,
        layer_collection: LayerCollection | None = None,
        chunk_size: int | None = None,
        device=None,
        progress=None,
        backend: str = "hooks",
        *,
        generator: JacobianGenerator | None = None,
        name: str = "J",
    ):
        if generator is None:
            if model is None:
                raise ArgumentTypeError("Jacobian needs a model (or generator=...)")
            generator = JacobianGenerator(
                model, function, layer_collection, chunk_size, device, progress, backend
            )
        if loader is None:
            raise ArgumentTypeError("Jacobian needs a loader of examples")
        self.generator = generator
        self.loader = loader
        self.layer_collection = generator.layer_collection
        self.fm = generator.flat_model()
        self._scan()
        p = self.layer_collection.numel()
        super().__init__(
            self._jvp_mat,
            (self.n_output * self.n_examples, p),
            dtype=generator.dtype,
            device=generator.device,
            rmatvec=self._vjp_mat,
            batched=True,
            name=name,
        )

    # ------------------------------------------------------------------ the data
    def _scan(self):
        """One forward pass: N, C, the chunk sizes, input fingerprints and the outputs f(x_n)."""
        sizes, prints, outs, cs = [], [], [], []
        with torch.no_grad():
            for chunk in self.generator.chunks(self.loader, "jacobian (scan)"):
                out = self.fm(self.fm.flat0, chunk)
                if not torch.isfinite(out).all():
                    raise NonFiniteError("the model output contains NaN or inf")
                sizes.append(out.shape[0])
                cs.append(out.shape[1])
                prints.append(_fingerprint(chunk, out.shape[0]))
                outs.append(out)
        if not sizes or sum(sizes) == 0:
            raise DataError("the loader yielded no examples")
        _check_same_c(cs)
        self.chunk_sizes = sizes
        self._prints = prints
        self.n_output = cs[0]
        self.n_examples = sum(sizes)
        self.outputs = torch.cat(outs, dim=0).T.contiguous()  # (C, N), f(x_n; θ₀)

    def _pass(self, desc):
        """Iterate the chunks again, checking that they are the ones seen at construction."""
        i = -1
        for i, chunk in enumerate(self.generator.chunks(self.loader, desc)):
            b = _batch_size(chunk)
            if i >= len(self.chunk_sizes) or b != self.chunk_sizes[i]:
                raise DataError(self._changed())
            sig = _fingerprint(chunk, b)
            if not torch.allclose(sig, self._prints[i], rtol=1e-9, atol=1e-9, equal_nan=True):
                raise DataError(self._changed())
            yield chunk
        if i + 1 != len(self.chunk_sizes):
            raise DataError(self._changed())

    @staticmethod
    def _changed() -> str:
        return (
            "the loader yielded different examples than when the Jacobian was built; it must "
            "yield the same examples in the same order at every pass (use shuffle=False)"
        )

    # ------------------------------------------------------------------ products
    def _f(self, chunk):
        return lambda w: self.fm(w, chunk)

    def _jvp_mat(self, v: torch.Tensor) -> torch.Tensor:
        """J V for V (P, k): (C·N, k)."""
        w0, k = self.fm.flat0, v.shape[1]
        if self.fm.tangent_mask is not None:  # padding rows of embeddings: see FlatModel
            v = v * self.fm.tangent_mask[:, None]
        cols = v.T
        parts = []
        for chunk in self._pass("J @ v"):
            f = self._f(chunk)
            if k == 1:
                parts.append(jvp(f, (w0,), (cols[0],))[1][None])
            else:
                one = lambda t, f=f: jvp(f, (w0,), (t,))[1]  # noqa: E731
                parts.append(vmap(one, chunk_size=MAX_COLUMNS)(cols))  # (k, B, C)
        jv = torch.cat(parts, dim=1)  # (k, N, C)
        return jv.permute(2, 1, 0).reshape(-1, k)

    def _vjp_mat(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀ U for U (C·N, k): (P, k)."""
        k = u.shape[1]
        u3 = u.reshape(self.n_output, self.n_examples, k)
        acc, start = None, 0
        for chunk, b in zip(self._pass("J.T @ u"), self.chunk_sizes):
            _, pull = vjp(self._f(chunk), self.fm.flat0)
            ub = u3[:, start : start + b, :].permute(2, 1, 0)  # (k, B, C): cotangents of (B, C)
            start += b
            if k == 1:
                g = pull(ub[0].contiguous())[0][None]
            else:
                g = vmap(lambda t, pull=pull: pull(t)[0], chunk_size=MAX_COLUMNS)(ub.contiguous())
            acc = g if acc is None else acc + g
        return acc.T

    def __matmul__(self, other):
        if isinstance(other, PVector):
            return self.jvp(other)
        return super().__matmul__(other)

    # ------------------------------------------------------------------ vectors
    def jvp(self, v) -> FVector:
        """J v for a :class:`PVector` (or a flat tensor), as an :class:`FVector` (C, N)."""
        flat = _pflat(v, self.layer_collection)
        return FVector(self.matvec(flat).view(self.n_output, self.n_examples))

    def vjp(self, u) -> PVector:
        """Jᵀ u for an :class:`FVector` (C, N) (or a tensor (C, N) / (C·N,)), as a PVector."""
        flat = _fflat(u, self.n_output, self.n_examples)
        return PVector(self.layer_collection, vector_repr=self.rmatvec(flat))

    def size(self, dim=None):
        s = (self.n_output, self.n_examples, self.layer_collection.numel())
        return s if dim is None else s[dim]

    def to_torch(self) -> torch.Tensor:
        """The dense Jacobian, shape [C, N, P] (NNGeometry's layout); uses per-example gradients."""
        if not torch.equal(self.generator.current_flat(), self.fm.flat0):
            raise DataError(
                "the model's parameters changed since this Jacobian was built; products still use "
                "the old ones, to_torch() cannot: build a new Jacobian"
            )
        parts = [self.generator.jacobian_chunk(ch) for ch in self._pass("jacobian")]
        return torch.cat(parts, dim=1)

    def pfmap(self) -> PFMapImplicit:
        return PFMapImplicit(self.generator, op=self)


def _pflat(v, lc) -> torch.Tensor:
    if isinstance(v, PVector):
        if v.layer_collection != lc:
            raise ShapeError("the PVector is over a different layer collection than the Jacobian")
        return v.to_torch()
    if torch.is_tensor(v):
        return v
    raise ArgumentTypeError(f"expected a PVector or a tensor, got {type(v).__name__}")


def _fflat(u, c, n) -> torch.Tensor:
    t = u.to_torch() if isinstance(u, FVector) else u
    if not torch.is_tensor(t):
        raise ArgumentTypeError(f"expected an FVector or a tensor, got {type(u).__name__}")
    if tuple(t.shape) not in ((c, n), (c * n,)):
        raise ShapeError(f"function-space vector of shape {tuple(t.shape)}, expected ({c}, {n})")
    return t.reshape(-1)


# ---------------------------------------------------------------------- NNGeometry-style maps
class PFMap:
    """A linear map from parameter space to function space, (C·N) × P, held as ``.op``.

    ``jvp(PVector) -> FVector``, ``vjp(FVector) -> PVector``, ``to_torch()`` [C, N, P], ``size()``,
    ``J @ x`` (PVector → FVector, tensor → tensor, ops node → lazy product) and ``J.T`` (the ops
    node Jᵀ) behave alike for the dense and implicit forms.
    """

    def __init__(
        self, layer_collection, op: LinearOperator, n_output: int, n_examples: int, generator=None
    ):
        if op.shape != (n_output * n_examples, layer_collection.numel()):
            raise ShapeError(
                f"map of shape {op.shape} for {n_output} outputs × {n_examples} examples and "
                f"{layer_collection.numel()} parameters"
            )
        self.layer_collection = layer_collection
        self.op = op
        self.n_output = n_output
        self.n_examples = n_examples
        self.generator = generator

    def size(self, dim=None):
        s = (self.n_output, self.n_examples, self.layer_collection.numel())
        return s if dim is None else s[dim]

    @property
    def T(self) -> LinearOperator:
        return self.op.T

    def jvp(self, v) -> FVector:
        flat = _pflat(v, self.layer_collection)
        return FVector((self.op @ flat).view(self.n_output, self.n_examples))

    mv = jvp

    def vjp(self, u) -> PVector:
        flat = _fflat(u, self.n_output, self.n_examples)
        return PVector(self.layer_collection, vector_repr=self.op.T @ flat)

    def __matmul__(self, other):
        if isinstance(other, PVector):
            return self.jvp(other)
        return self.op @ other

    def to_torch(self) -> torch.Tensor:
        return self.op.to_dense().view(self.n_output, self.n_examples, -1)

    get_dense_tensor = to_torch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.op}, [{self.n_output}, {self.n_examples}, {self.layer_collection.numel()}])"


class PFMapExpr(PFMap):
    """Any ops expression from parameter space to function space (e.g. ``K @ J``)."""


class PFMapDense(PFMap):
    """The Jacobian stored densely, ``data`` of shape [C, N, P]; ``op`` is a ``Dense`` (C·N) × P."""

    def __init__(self, generator=None, data=None, examples=None, layer_collection=None):
        if data is None:
            if generator is None or examples is None:
                raise ArgumentTypeError(
                    "PFMapDense needs data=[C, N, P] or a generator and examples"
                )
            data = generator.get_jacobian(examples)
        if data.dim() != 3:
            raise ShapeError(f"PFMapDense data must be [C, N, P], got {tuple(data.shape)}")
        if layer_collection is None and generator is None:
            raise ArgumentTypeError(
                "PFMapDense(data=...) needs layer_collection=... or a generator"
            )
        lc = layer_collection if layer_collection is not None else generator.layer_collection
        self.data = data
        c, n, p = data.shape
        super().__init__(
            lc, Dense(data.reshape(c * n, p), symmetric=False, name="J"), c, n, generator
        )

    def to_torch(self) -> torch.Tensor:
        return self.data

    get_dense_tensor = to_torch

    def __add__(self, other):
        return PFMapDense(
            self.generator,
            data=self.data + other.to_torch(),
            layer_collection=self.layer_collection,
        )

    def __rmul__(self, x):
        return PFMapDense(
            self.generator, data=x * self.data, layer_collection=self.layer_collection
        )


class PFMapImplicit(PFMap):
    """The Jacobian known by its products: ``op`` is a :class:`Jacobian` node (JVP / VJP)."""

    def __init__(self, generator, data=None, examples=None, op: Jacobian | None = None):
        if data is not None:
            raise ArgumentTypeError("PFMapImplicit holds no data; use PFMapDense")
        if op is None:
            if examples is None:
                raise ArgumentTypeError("PFMapImplicit needs examples (a loader)")
            op = generator.jacobian_op(examples)
        self.examples = op.loader
        super().__init__(op.layer_collection, op, op.n_output, op.n_examples, generator)

    def to_torch(self) -> torch.Tensor:
        return self.op.to_torch()

    get_dense_tensor = to_torch


# ---------------------------------------------------------------------- pushforward of a PMat
def mapTMmap(F, J, reduction: str | None = None):
    """The pushforward J F Jᵀ of a parameter-space matrix F through a map J.

    ``F`` is a representation (anything with ``.op``, e.g. a ``PMat*``) or an ops node (P × P);
    ``J`` a :class:`Jacobian`, a :class:`PFMap` or an ops node ((C·N) × P).

    * ``reduction=None``: the lazy ops product ``J·F·Jᵀ`` ((C·N) × (C·N), tagged PSD when F is),
      wrapped as an :class:`~nngeo_ops.nn.ntk.FMatExpr` in function space when J knows C and N;
    * ``"diag"``: the tensor (C, N) of J_{cn} F J_{cn}ᵀ (NNGeometry's ``mapTMmap(.., "diag")``);
    * ``"sum"``: the tensor (N,) of Σ_c J_{cn} F J_{cn}ᵀ (NNGeometry's default ``"sum"``).

    The reductions materialise J one row block at a time: (C·N) reverse-mode products for an
    implicit J.
    """
    fop = F.op if hasattr(F, "op") and not isinstance(F, LinearOperator) else F
    jop = J.op if isinstance(J, PFMap) else J
    if not isinstance(fop, LinearOperator) or not isinstance(jop, LinearOperator):
        raise ArgumentTypeError("mapTMmap takes a representation / ops node F and a Jacobian J")
    if fop.shape != (jop.shape[1], jop.shape[1]):
        raise ShapeError(f"F of shape {fop.shape} cannot be pushed through J of shape {jop.shape}")
    c = getattr(J, "n_output", None)
    n = getattr(J, "n_examples", None)
    if reduction is None:
        prod = jop @ fop @ jop.T
        if c is None:
            return prod
        from .ntk import FMatExpr

        return FMatExpr(prod, c, n, getattr(J, "generator", None))
    if reduction not in ("diag", "sum"):
        raise InvalidArgumentError(f"reduction must be None, 'diag' or 'sum', got {reduction!r}")
    if c is None:
        raise ArgumentTypeError("reductions need a Jacobian / PFMap that knows C and N")
    if isinstance(jop, Dense):
        jd = jop.M
    elif isinstance(J, Jacobian) or isinstance(jop, Jacobian):
        jd = (J if isinstance(J, Jacobian) else jop).to_torch().reshape(c * n, -1)
    else:
        jd = jop.to_dense()
    d = ((fop @ jd.T).T * jd).sum(1).view(c, n)
    return d if reduction == "diag" else d.sum(0)
