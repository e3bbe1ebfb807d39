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
* ``PFMapDense`` / ``PFMapImplicit`` (:mod:`nngeo_ops.nn.fspace.pfmap`) are NNGeometry-style wrappers
  (``jvp`` takes a :class:`PVector` and returns an :class:`FVector`, ``vjp`` the converse) over a
  dense [C, N, P] tensor or over a :class:`Jacobian` node.
* ``mapTMmap`` (same module) gives J F Jᵀ for a parameter-space matrix F (lazy, or reduced per
  example).

Materialising J (``to_torch()``, the Gram matrices of :mod:`nngeo_ops.nn.engine.ntk`) uses batched
per-example gradients (:mod:`nngeo_ops.nn.engine.jacobian_generator`) from the hook engine of
:mod:`nngeo_ops.nn.engine.capture` — one forward and one
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

import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from ...errors import ArgumentTypeError, DataError, NonFiniteError, ShapeError, UnsupportedError
from ...ops import MatFree
from ..data import (
    FINGERPRINT_RTOL,
    LOADER_CHANGED,
    as_loader,
    batch_size_of,
    check_same_outputs,
    fingerprint,
)
from ..engine import functional as fx
from ..engine.distributed import all_reduce_sum
from ..engine.jacobian_generator import JacobianGenerator
from ..params import FVector, LayerCollection, PVector, flat_fvector, flat_pvector

# Columns of a block product pushed through one vmapped jvp / vjp at a time: bounds the memory of
# J @ V for wide V (e.g. to_dense() of a small implicit operator) to this many copies of the
# activations of one chunk of examples.
MAX_COLUMNS = 128


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
            docstring on ordering): a re-iterable loader, or one batch — a tuple / list of tensors
            whose first dimensions agree (the rule of :mod:`nngeo_ops.nn.data`).
        function: ``function(*batch) -> outputs`` (default ``model(batch[0])``), any function of
            the model, e.g. a per-example loss ``(B,)``.
        layer_collection: the parameters θ (default all trainable ones).
        chunk_size: at most this many examples per forward pass (None: the loader's batches).
        device, progress, backend: see :class:`JacobianGenerator`.
        generator: an existing :class:`JacobianGenerator` instead of model/function/... .
        name: how the node prints (``J``).
        params: the flat covered parameters to linearise at (default: the model's current ones),
            e.g. a snapshot taken earlier by another operator.
        max_batches: read only the first ``max_batches`` batches at each pass (a streaming loader).
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
        params: torch.Tensor | None = None,
        max_batches: int | None = None,
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
        self.loader = as_loader(
            loader, reiterable=True, max_batches=max_batches
        )  # read again at every product
        self.layer_collection = generator.layer_collection
        self.fm = generator.flat_model()
        if params is not None:
            if params.shape != self.fm.flat0.shape:
                raise ShapeError(
                    f"params has shape {tuple(params.shape)}, expected {tuple(self.fm.flat0.shape)}"
                )
            self.fm.flat0 = params
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
                prints.append(fingerprint(chunk, out.shape[0]))
                outs.append(out)
        if not sizes or sum(sizes) == 0:
            raise DataError("the loader yielded no examples")
        check_same_outputs(cs)
        self.chunk_sizes = sizes
        self._prints = prints
        self.n_output = cs[0]
        self.n_examples = sum(sizes)
        self.outputs = torch.cat(outs, dim=0).T.contiguous()  # (C, N), f(x_n; θ₀)

    def _pass(self, desc):
        """Iterate the chunks again, checking that they are the ones seen at construction."""
        i = -1
        for i, chunk in enumerate(self.generator.chunks(self.loader, desc)):
            b = batch_size_of(chunk)
            if i >= len(self.chunk_sizes) or b != self.chunk_sizes[i]:
                raise DataError(LOADER_CHANGED)
            sig = fingerprint(chunk, b)
            ok = torch.allclose(
                sig, self._prints[i], rtol=FINGERPRINT_RTOL, atol=1e-6, equal_nan=True
            )
            if not ok:
                raise DataError(LOADER_CHANGED)
            yield chunk
        if i + 1 != len(self.chunk_sizes):
            raise DataError(LOADER_CHANGED)

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
            try:
                if k == 1:
                    parts.append(jvp(f, (w0,), (cols[0],))[1][None])
                else:
                    one = lambda t, f=f: jvp(f, (w0,), (t,))[1]  # noqa: E731
                    parts.append(vmap(one, chunk_size=MAX_COLUMNS)(cols))  # (k, B, C)
            except (RuntimeError, NotImplementedError):  # no forward mode, or not torch.func-able
                parts.append(fx.jv_by_double_vjp(self.fm, chunk, v))
        jv = torch.cat(parts, dim=1)  # (k, N, C)
        return jv.permute(2, 1, 0).reshape(-1, k)

    def _vjp_mat(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀ U for U (C·N, k): (P, k)."""
        k = u.shape[1]
        u3 = u.reshape(self.n_output, self.n_examples, k)
        acc, start = None, 0
        for chunk, b in zip(self._pass("J.T @ u"), self.chunk_sizes):
            ub = u3[:, start : start + b, :].permute(2, 1, 0)  # (k, B, C): cotangents of (B, C)
            start += b
            try:
                _, pull = vjp(self._f(chunk), self.fm.flat0)
                if k == 1:
                    g = pull(ub[0].contiguous())[0][None]
                else:
                    g = vmap(lambda t, pull=pull: pull(t)[0], chunk_size=MAX_COLUMNS)(
                        ub.contiguous()
                    )
            except (RuntimeError, NotImplementedError):  # not runnable under torch.func
                g = fx.vjp_by_autograd(self.fm, chunk, ub.contiguous())
            acc = g if acc is None else acc + g
        if acc is None:  # an empty shard
            acc = torch.zeros(k, self.shape[1], dtype=self.dtype, device=self.device)
        if self.generator.process_group is not None:  # Jᵀ U sums over the rows of every rank
            all_reduce_sum(self.generator.process_group, [acc])
        return acc.T

    def __matmul__(self, other):
        if isinstance(other, PVector):
            return self.jvp(other)
        return super().__matmul__(other)

    # ------------------------------------------------------------------ vectors
    def jvp(self, v) -> FVector:
        """J v for a :class:`PVector` (or a flat tensor), as an :class:`FVector` (C, N)."""
        flat = flat_pvector(v, self.layer_collection)
        return FVector(self.matvec(flat).view(self.n_output, self.n_examples))

    def vjp(self, u) -> PVector:
        """Jᵀ u for an :class:`FVector` (C, N) (or a tensor (C, N) / (C·N,)), as a PVector."""
        flat = flat_fvector(u, self.n_output, self.n_examples)
        return PVector(self.layer_collection, vector_repr=self.rmatvec(flat))

    def size(self, dim=None):
        """``(C, N, P)`` (outputs, examples, covered parameters), or one entry of it for ``dim``."""
        s = (self.n_output, self.n_examples, self.layer_collection.numel())
        return s if dim is None else s[dim]

    def to_torch(self) -> torch.Tensor:
        """The dense Jacobian, shape [C, N, P] (NNGeometry's layout); uses per-example gradients."""
        if not torch.equal(self.generator.current_flat(), self.fm.flat0):
            raise DataError(
                "the model's parameters changed since this Jacobian was built; products still use "
                "the old ones, to_torch() cannot: build a new Jacobian"
            )
        run = self.generator.start()
        parts = [self.generator.jacobian_chunk(ch, run) for ch in self._pass("jacobian")]
        return torch.cat(parts, dim=1)

    def gram(self) -> torch.Tensor | None:
        """J Jᵀ, (C·N) × (C·N) in the row order of J, from the NTK engine of :mod:`nngeo_ops.nn.engine.ntk`
        (per-chunk features, no loop over examples); None when the model's parameters are no longer
        those of this node (the engine reads the model). The ops rules use it to solve damped
        Gauss-Newton systems in function space."""
        if self.generator.process_group is not None:
            raise UnsupportedError(
                "this Jacobian is sharded over a process group (each rank holds its own rows), so "
                "J Jᵀ of its rows is not the Gram matrix of all examples and function-space "
                "routes do not apply: use GramMatrix (gathered) or iterative solvers on Jᵀ·M·J"
            )
        if not torch.equal(self.generator.current_flat(), self.fm.flat0):
            return None
        # the chunks of a checked pass (a reshuffled loader raises, as in every product)
        k = self.generator.get_gram_matrix(list(self._pass("gram")))
        m = self.shape[0]
        return k.reshape(m, m).to(self.dtype)


def jacobian_op(generator: JacobianGenerator, examples, name: str = "J") -> Jacobian:
    """The :class:`Jacobian` node of ``generator`` over ``examples`` (one batch or a loader).

    Also available as the method ``generator.jacobian_op(examples, name)``: the engine does not
    build the nodes on top of it, this layer lends it the method.
    """
    return Jacobian(generator=generator, loader=examples, name=name)


JacobianGenerator.jacobian_op = jacobian_op
