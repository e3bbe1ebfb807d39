"""Parameter-space matrices (NNGeometry's ``PMat*``) as thin wrappers over ``ops`` expressions.

Every representation holds a lazy operator ``F.op`` (a node of :mod:`nngeo_ops.ops`) of shape (P, P),
P = ``layer_collection.numel()``, in the collection's flat order. All methods take and return
:class:`PVector` (tensors are accepted too) and delegate to the node, so what ``ops`` knows — rewrite
rules, cached factorisations, iterative fallbacks — applies unchanged.

Damping always means M + λI exactly: ``solve(v, regul=λ)``, ``inverse(regul=λ)`` and
``pow(p, regul=λ)`` act on ``op + λ·I`` in every representation (for KFAC/EKFAC through the eigen form
of the factors, by the ops rules). The defaults ``regul=1e-8`` are NNGeometry's.

Construction: ``PMatX(generator, data=None, examples=None)``; most users go through ``FIM``, ``GGN``,
``Hessian``... (:mod:`nngeo_ops.nn.api`). :func:`build_many` gathers several representations of
one generator in a single pass over the data.
"""

from __future__ import annotations

import numbers

import torch

from ...errors import ShapeError, UnsupportedError
from ...memory import available_memory, check_memory
from ...ops import BlockDiag, Dense, Diagonal, Identity, LinearOperator, LowRank, ScaledIdentity
from ..engine.accumulators import BlockAcc, DenseAcc, DiagAcc, GradsAcc
from ..engine.finite import check_regul  # noqa: F401  (re-exported: the representations use it)
from ..engine.precision import HALF
from ..fspace.fmat import mapTMmap
from ..params import LayerCollection, PVector
from .implicit import implicit_curvature


class Representation:
    """The protocol of a representation gathered from one pass of the curvature engine.

    A representation class says which statistics it needs and how its ``data`` follows from them;
    :meth:`CurvatureGenerator.run <nngeo_ops.nn.CurvatureGenerator.run>` runs the pass, and
    :func:`build_many` shares one pass among several classes. To add a representation, subclass
    :class:`PMatAbstract` (which follows this protocol) and override:

    * :meth:`accumulators` — fresh accumulators for one pass (objects of
      :mod:`nngeo_ops.nn.engine.accumulators` with ``update(ctx)``, ``finalize(...)`` and ``value``),
      or ``None`` (the default) when the representation is not gathered from a pass (implicit
      products, the identity, expressions); :func:`build_many` refuses those;
    * :meth:`data_from` — the constructor's ``data`` from the finished accumulators (default: the
      ``value`` of the only accumulator).

    :meth:`data_from_examples` (one pass of its own) follows from the two.
    """

    @classmethod
    def accumulators(cls, generator) -> list | None:
        """Fresh accumulators for one pass over the data, or None if not gathered from a pass."""
        return None

    @classmethod
    def data_from(cls, generator, accs):
        """The ``data`` of the representation from its accumulators after the pass."""
        return accs[0].value

    @classmethod
    def data_from_examples(cls, generator, examples):
        """The ``data`` of the representation from one pass over ``examples`` of its own."""
        accs = cls.accumulators(generator)
        if accs is None:
            raise UnsupportedError(f"{cls.__name__} is not gathered from a pass over the data")
        generator.run(examples, accs, desc=cls.__name__)
        return cls.data_from(generator, accs)


class PMatAbstract(Representation):
    """Shared behaviour of all representations (and of the results of their arithmetic)."""

    def __init__(self, layer_collection: LayerCollection, op: LinearOperator, generator=None):
        n = layer_collection.numel()
        if tuple(op.shape) != (n, n):
            raise ShapeError(f"operator of shape {tuple(op.shape)} for {n} parameters")
        self.layer_collection = layer_collection
        self.generator = generator
        self._op = op

    @property
    def op(self) -> LinearOperator:
        """The ops node (shape (P, P), flat order of the layer collection)."""
        return self._op

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.op}, {self.layer_collection.numel()} parameters)"

    def size(self, dim=None):
        """``(d, d)`` with ``d`` the number of covered parameters, or ``d`` for ``dim`` 0 or 1."""
        n = self.layer_collection.numel()
        return (n, n) if dim is None else n

    # ------------------------------------------------------------------ vectors
    def _flat(self, v) -> torch.Tensor:
        if isinstance(v, PVector):
            lc = v.layer_collection
            if lc is not self.layer_collection and lc != self.layer_collection:
                raise ShapeError("the PVector is over a different layer collection than the matrix")
            v = v.to_torch()
        elif not torch.is_tensor(v):
            raise TypeError(f"expected a PVector or a tensor, got {type(v).__name__}")
        if v.dtype in HALF and self.op.dtype not in HALF:  # a half model's float32 statistics
            return v.to(self.op.dtype)
        return v

    def _wrap(self, like, flat):
        dtype = like.to_torch().dtype if isinstance(like, PVector) else like.dtype
        if dtype in HALF and flat.dtype != dtype:  # back to the vector's own precision
            flat = flat.to(dtype)
        return (
            PVector(self.layer_collection, vector_repr=flat) if isinstance(like, PVector) else flat
        )

    def _damped(self, regul) -> LinearOperator:
        check_regul(regul)
        if regul is None or regul == 0:
            return self.op
        op = self.op
        # one node per numeric damping, so that repeated solves reuse its compiled form (ops caches
        # that on the node, against the versions of its leaves) instead of rewriting anew each time
        key = float(regul) if type(regul) is float or isinstance(regul, numbers.Real) else None
        cache = self.__dict__.setdefault("_damped_nodes", {})
        hit = cache.get(key) if key is not None else None
        if hit is not None and hit[0] is op:
            return hit[1]
        if key is not None:  # key·I built at once: the node ``regul * Identity(...)`` gives
            shift = ScaledIdentity(key, op.shape[0], op.dtype, op.device)
        else:
            shift = regul * Identity(op.shape[0], dtype=op.dtype, device=op.device)
        node = op + shift
        if key is not None:
            if len(cache) >= 8:
                cache.pop(next(iter(cache)))
            cache[key] = (op, node)
        return node

    def damped(self, regul) -> LinearOperator:
        """The ops node ``M + regul·I`` (exact damping: the shift is added to the whole matrix,
        never to a factor), a ``(P, P)`` operator in the statistics' precision.

        :meth:`solve`, :meth:`inverse` and :meth:`pow` compile this node; one node is kept per
        numeric ``regul`` (the last 8), so that repeated calls reuse its compiled factorisation.
        ``regul`` of ``None`` or 0 returns the representation's own node. A non-finite ``regul``
        raises :class:`~nngeo_ops.errors.NonFiniteError`, a non-number or a tensor of more than
        one entry :class:`~nngeo_ops.errors.ArgumentTypeError`.
        """
        return self._damped(regul)

    def mv(self, v):
        """M v."""
        return self._wrap(v, self.op @ self._flat(v))

    def vTMv(self, v) -> torch.Tensor:
        """vᵀ M v (a scalar tensor)."""
        x = self._flat(v)
        return torch.dot(x, self.op @ x)  # in the statistics' precision

    def solve(self, v, regul: float = 1e-8):
        """(M + regul·I)⁻¹ v."""
        return self._wrap(v, self._damped(regul).solve(self._flat(v)))

    def inverse(self, regul: float = 1e-8) -> PMatAbstract:
        """(M + regul·I)⁻¹ as a lazy representation."""
        return PMatExpr(self.layer_collection, self._damped(regul).inv(), self.generator)

    def pow(self, p: float, regul: float = 0.0) -> PMatAbstract:
        """(M + regul·I)^p as a lazy representation (p = -1, ±1/2, ...)."""
        return PMatExpr(self.layer_collection, self._damped(regul).pow(p), self.generator)

    def trace(self) -> torch.Tensor:
        """``tr M`` of the ops node, a 0-dim tensor (see :meth:`nngeo_ops.ops.LinearOperator.trace`)."""
        return self.op.trace()

    def frobenius_norm(self) -> torch.Tensor:
        """``‖M‖_F`` of the ops node, a 0-dim tensor."""
        return self.op.frobenius_norm()

    def get_diag(self) -> torch.Tensor:
        """The diagonal of ``M``, shape ``(d,)`` in the flat order of the layer collection."""
        return self.op.diag()

    def to_torch(self) -> torch.Tensor:
        """The dense (P, P) tensor (only sensible for small P)."""
        return self.op.to_dense()

    get_dense_tensor = to_torch

    def eigh(self):
        """The eigendecomposition as an ops ``Eigen`` node (structured where the node allows)."""
        return self.op.eigh()

    def get_eigendecomposition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues ascending, eigenvectors as columns), dense."""
        e = self.op.eigh()
        evals, q = e.evals, e.Q.to_dense()
        order = torch.argsort(evals)
        return evals[order], q[:, order]

    # ------------------------------------------------------------------ arithmetic
    def __matmul__(self, other):
        """``F @ v`` (:meth:`mv` for a PVector or a flat tensor); ``F @ G`` with G a parameter-space
        matrix is a lazy :class:`PMatExpr`; ``F @ A`` with A an ops node (``J.T`` for a Jacobian
        J) the lazy ops product ``F.op·A``, so that ``J @ F @ J.T`` is the pushforward J F Jᵀ."""
        if isinstance(other, PMatAbstract):
            if other.layer_collection != self.layer_collection:
                raise ShapeError("cannot multiply matrices over different layer collections")
            return PMatExpr(self.layer_collection, self.op @ other.op, self.generator)
        if isinstance(other, LinearOperator):
            return self.op @ other
        return self.mv(other)

    def __mul__(self, c):
        if not isinstance(c, numbers.Number) and not (torch.is_tensor(c) and c.dim() == 0):
            return NotImplemented
        return PMatExpr(self.layer_collection, c * self.op, self.generator)

    __rmul__ = __mul__

    def __truediv__(self, c):
        return self * (1.0 / c)

    def __neg__(self):
        return self * -1.0

    def __add__(self, other):
        if isinstance(other, PMatAbstract):
            if other.layer_collection != self.layer_collection:
                raise ShapeError("cannot add matrices over different layer collections")
            return PMatExpr(self.layer_collection, self.op + other.op, self.generator)
        if isinstance(other, LinearOperator):
            return PMatExpr(self.layer_collection, self.op + other, self.generator)
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other):
        if isinstance(other, PMatAbstract | LinearOperator):
            return self + (-1.0) * other
        return NotImplemented

    def mapTMmap(self, J, reduction: str | None = None):
        """The pushforward J M Jᵀ through a Jacobian ``J`` (see :func:`~nngeo_ops.nn.fspace.fmat.mapTMmap`):
        lazy ``J·M·Jᵀ`` in function space, or the ``"diag"`` / ``"sum"`` reductions."""
        return mapTMmap(self, J, reduction)

    def add_identity(self, regul: float) -> PMatAbstract:
        """M + regul·I (lazy)."""
        return PMatExpr(self.layer_collection, self._damped(regul), self.generator)


class PMatExpr(PMatAbstract):
    """Any ops expression over a layer collection (results of ``+``, ``*``, ``inverse``...)."""


def check_dense_fits(generator, rep: str) -> None:
    """Refuse, before the pass, a ``PMatDense`` / ``PMatBlockDiag`` whose stored matrices alone take
    more than the memory available on the generator's device (:func:`nngeo_ops.memory.available_memory`):
    the allocation would fail deep inside torch, or the process be killed, after the data were read.

    ``PMatDense`` stores P² numbers, ``PMatBlockDiag`` Σ_l d_l² (d_l: the parameters of layer l), in
    the statistics' precision. Raises :class:`~nngeo_ops.errors.MemoryLimitError` naming the size,
    the largest layer and the representations that fit.
    """
    lc = generator.layer_collection
    sizes = {lid: entry.numel() for lid, entry in lc.items()}
    dense = rep == "PMatDense"
    need = (
        lc.numel() ** 2 if dense else sum(d * d for d in sizes.values())
    ) * generator.dtype.itemsize
    free = available_memory(generator.device)
    if free is None:  # unknown: no check
        return
    lid = max(sizes, key=sizes.get)
    where = (
        f"{lc.numel():,} parameters"
        if dense
        else f"the largest block: layer {lid!r}, {sizes[lid]:,} parameters"
    )
    check_memory(
        need,
        f"{rep} ({where})",
        "use PMatKFAC, PMatEKFAC or PMatDiag (PMatImplicit for products only), or a "
        "LayerCollection without the largest layers",
        limit=free,
    )


def _from_generator(cls, generator, examples, accumulators):
    generator.run(examples, accumulators, desc=cls.__name__)
    return accumulators


def _data_from_examples(cls, generator, examples):
    """A representation's data from one pass over ``examples`` with its own accumulators."""
    return cls.data_from_examples(generator, examples)


class PMatDense(PMatAbstract):
    """The full (P, P) matrix, ``Dense`` node. ``data``: the tensor.

    Rows and columns follow the flat order of the layer collection; storage is P² numbers, solves
    and log-determinants factorise it (O(P³), cached).
    """

    def __init__(self, generator, data=None, examples=None):
        if data is None:
            if generator.is_hessian:
                check_dense_fits(generator, "PMatDense")
                data = generator.hessian_dense(examples)
            else:
                (acc,) = _from_generator(
                    type(self), generator, examples, self.accumulators(generator)
                )
                data = self.data_from(generator, [acc])
        self.data = data
        psd = not generator.is_hessian
        super().__init__(
            generator.layer_collection, Dense(data, symmetric=True, psd=psd), generator
        )

    @staticmethod
    def accumulators(generator):
        """The statistics this representation gathers in a pass over the data (a list of accumulators fed
        by :meth:`CurvatureGenerator.run`; :func:`build_many` shares one pass among several classes).
        """
        check_dense_fits(generator, "PMatDense")
        return [DenseAcc()]

    @staticmethod
    def data_from(generator, accs):
        """The ``data`` of this representation from its accumulators after the pass (see
        :meth:`accumulators`): the dense ``(d, d)`` matrix.
        """
        return accs[0].value


class PMatBlockDiag(PMatAbstract):
    """One dense block per layer, ``BlockDiag`` of ``Dense``. ``data``: {layer_id: block}.

    Block ``l`` is the ``(d_l, d_l)`` diagonal block of the full matrix over layer ``l``'s
    parameters (flat order within the layer); couplings between layers are dropped.
    """

    def __init__(self, generator, data=None, examples=None):
        if data is None:
            if generator.is_hessian:
                check_dense_fits(generator, "PMatBlockDiag")
                data = generator.hessian_blocks(examples)
            else:
                accs = _from_generator(
                    type(self), generator, examples, self.accumulators(generator)
                )
                data = self.data_from(generator, accs)
        self.data = data
        psd = not generator.is_hessian
        lc = generator.layer_collection
        blocks = [Dense(data[lid], symmetric=True, psd=psd, name=f"F[{lid}]") for lid in lc.layers]
        super().__init__(lc, BlockDiag(blocks, names=list(lc.layers)), generator)

    @staticmethod
    def accumulators(generator):
        """The statistics this representation gathers in a pass over the data (a list of accumulators fed
        by :meth:`CurvatureGenerator.run`; :func:`build_many` shares one pass among several classes).
        """
        check_dense_fits(generator, "PMatBlockDiag")
        return [BlockAcc(generator.layer_collection.layers)]

    @staticmethod
    def data_from(generator, accs):
        """The ``data`` of this representation from its accumulators after the pass (see
        :meth:`accumulators`): ``{layer id: (d_l, d_l) block}``.
        """
        return accs[0].value


class PMatDiag(PMatAbstract):
    """The diagonal, ``Diagonal`` node. ``data``: the (P,) tensor ``(M_ii)``, in the flat order of
    the layer collection (for the Hessian, the diagonals of its exact per-layer blocks)."""

    def __init__(self, generator, data=None, examples=None):
        lc = generator.layer_collection
        checked = None  # (min, max) of data, taken by the pass's finiteness check
        if data is None:
            if generator.is_hessian:
                blocks = generator.hessian_blocks(examples)
                data = torch.cat([blocks[lid].diagonal() for lid in lc.layers])
            else:
                accs = _from_generator(
                    type(self), generator, examples, self.accumulators(generator)
                )
                data = self.data_from(generator, accs)
                checked = _checked_range(accs[0], data)
        self.data = data
        super().__init__(lc, Diagonal(data, value_range=checked), generator)

    @staticmethod
    def accumulators(generator):
        """The statistics this representation gathers in a pass over the data (a list of accumulators fed
        by :meth:`CurvatureGenerator.run`; :func:`build_many` shares one pass among several classes).
        """
        return [DiagAcc(generator.layer_collection.layers)]

    @staticmethod
    def data_from(generator, accs):
        """The ``data`` of this representation from its accumulators after the pass (see
        :meth:`accumulators`): the diagonal, shape ``(d,)`` in flat order.
        """
        return accs[0].concatenated()


def _checked_range(acc, data):
    """``(min, max)`` of ``data`` when it is the diagonal accumulator's buffer, unchanged since the
    pass checked it (``value_range`` of :func:`~nngeo_ops.nn.engine.finite.check_statistics`)."""
    rng = getattr(acc, "value_range", None)
    if rng is None or data is not acc.flat() or data._version != rng[2]:
        return None
    return rng[0], rng[1]


class PMatLowRank(PMatAbstract):
    """M = U Uᵀ with U the scaled per-(column, example) gradients, (P, K·N); ``LowRank`` node."""

    def __init__(self, generator, data=None, examples=None):
        if generator.is_hessian:
            raise UnsupportedError(
                "PMatLowRank is not available for the Hessian (not a Gram matrix)"
            )
        if data is None:
            data = _data_from_examples(type(self), generator, examples)
        self.data = data
        super().__init__(generator.layer_collection, LowRank(data, psd=True), generator)

    @staticmethod
    def accumulators(generator):
        """The statistics this representation gathers in a pass over the data (a list of accumulators fed
        by :meth:`CurvatureGenerator.run`; :func:`build_many` shares one pass among several classes).
        """
        return [GradsAcc()]

    @staticmethod
    def data_from(generator, accs):
        """The ``data`` of this representation from its accumulators after the pass (see
        :meth:`accumulators`): the factor ``U`` of ``M = U Uᵀ``.
        """
        return accs[0].value


class PMatImplicit(PMatAbstract):
    """Jᵀ H J (or the Hessian) known only through products; nothing of size P×P is stored.

    For the GGN and the Fisher variants ``F.op`` is the ops product ``Jᵀ·H·J``
    (:class:`~nngeo_ops.nn.pspace.implicit.GaussNewton`): ``F.op.J`` is the per-example
    :class:`~nngeo_ops.nn.fspace.jacobian.Jacobian` node, (C·N) × P with rows output-major, and ``F.op.H``
    the output-space curvature s·blockdiag_n(L_n L_nᵀ) in the same row order (s = 1/N for a mean
    reduction). ``simplify`` and ``explain`` see that structure; products take a fused path, one
    pass over ``examples`` (a forward pass carrying the tangent, the output factor, a backward pass).
    With C·N outputs × examples at most ``CompilePolicy.dense_limit``, the algebra uses the structure:
    the damped solve and log-determinant go through a (C·N)-dimensional system (Woodbury in function
    space), the trace and Frobenius norm through tr(H·J Jᵀ), and ``eigh`` gives the nonzero spectrum
    exactly (a truncated eigen form whose basis Jᵀ·C is never formed); J Jᵀ comes from the NTK
    engine; the diagonal comes from one pass of the statistics engine (exact and empirical kinds).
    For the Hessian ``F.op`` is a batched ``MatFree`` ``∇²L`` (Hessian-vector products). What has no
    structured route falls back to the ops policies (iterative methods or, for small P,
    densification).

    The operator is the curvature at the parameters of construction, as for every representation:
    later updates of the model do not change it.

    ``cache=True`` linearises each batch once, at the first product, and keeps its graphs: every later
    product is two backward passes per batch and no forward pass — the better choice when the operator
    is applied many times (CG, Lanczos, Hutchinson), memory permitting (the activations of the whole
    loader and of its backward pass are kept). :meth:`clear_cache` frees it. Through the entry
    points: ``FIM(model, loader, functools.partial(PMatImplicit, cache=True))``.
    """

    def __init__(self, generator, data=None, examples=None, cache: bool = False):
        if examples is None:
            raise ValueError("PMatImplicit needs examples (a loader) to apply the matrix")
        self.examples = examples
        self.cache = cache
        op = implicit_curvature(generator, examples, cache=cache)
        self._products = op.products
        super().__init__(generator.layer_collection, op, generator)

    def clear_cache(self) -> None:
        """Free the linearised batches of ``cache=True`` (rebuilt at the next product)."""
        self._products.clear()


class PMatEye(PMatAbstract):
    """scaling · I, ``ScaledIdentity`` node; build with a generator or a layer collection."""

    def __init__(
        self, generator=None, data=None, examples=None, layer_collection=None, scaling=1.0
    ):
        lc = layer_collection if layer_collection is not None else generator.layer_collection
        self.scaling = scaling if data is None else data
        kw = {}
        if generator is not None:
            kw = {"dtype": generator.dtype, "device": generator.device}
        super().__init__(lc, ScaledIdentity(self.scaling, lc.numel(), **kw), generator)


def build_many(generator, examples, representations) -> list[PMatAbstract]:
    """Several representations of one generator from ONE pass over ``examples``.

    ``representations`` is a list of classes (PMatDense, PMatDiag, PMatBlockDiag, PMatKFAC,
    PMatLowRank, PMatQuasiDiag, or any class following the :class:`Representation` protocol); the
    statistics of all are gathered together. A class that is not gathered from a pass (its
    ``accumulators`` is None: PMatImplicit, PMatEye) raises
    :class:`~nngeo_ops.errors.UnsupportedError`.
    """
    plans = []
    for cls in representations:
        accs = None
        if isinstance(cls, type) and issubclass(cls, Representation):
            accs = cls.accumulators(generator)
        if accs is None:
            name = getattr(cls, "__name__", type(cls).__name__)
            raise UnsupportedError(f"{name} cannot be gathered in a shared pass")
        plans.append((cls, accs))
    generator.run(examples, [a for _, accs in plans for a in accs], desc="curvature")
    return [cls(generator, data=cls.data_from(generator, accs)) for cls, accs in plans]
