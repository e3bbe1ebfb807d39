"""Matrices in function space, (C·N) × (C·M), NNGeometry's FMat* with an ops node underneath.

:class:`FMatDense` holds the Gram tensor [C, N, C, M] (``op`` a ``Dense`` node tagged symmetric PSD
when square); :class:`FMatImplicit` never stores it (``op`` applies J (Jᵀ V)). Layout and
conventions: :mod:`nngeo_ops.nn.fspace.ntk`.
"""

from __future__ import annotations

import numbers

import torch

from ...errors import ArgumentTypeError, DataError, InvalidArgumentError, ShapeError
from ...ops import Dense, Identity, LinearOperator, MatFree
from ...ops.base import is_scalar
from ..data import as_loader
from ..engine.finite import check_regul
from ..engine.ntk import cross_kernel_tensor, kernel_diag, kernel_tensor
from ..params import FVector, flat_fvector
from .jacobian import Jacobian, jacobian_op
from .pfmap import PFMap, PFMapExpr


# ---------------------------------------------------------------------- function-space matrices
class FMatAbstract:
    """A matrix in function space, (C·N) × (C·M), held as the ops node ``op``.

    ``size()`` is NNGeometry's 4-d ``(C, N, C, M)``; ``shape``/``dtype``/``device`` are those of the
    flattened operator so that the object can be handed to :mod:`nngeo_ops.linalg` directly.
    Vectors are :class:`FVector` (C, N), tensors (C, N), or flat tensors (C·N,) / (C·N, k); results
    come back in the same form. Damping: ``solve(v, regul=λ)`` acts on K + λI exactly.
    """

    def __init__(
        self,
        op: LinearOperator,
        n_output: int,
        n_examples: int,
        generator=None,
        n_examples_right=None,
    ):
        m = n_examples if n_examples_right is None else n_examples_right
        if tuple(op.shape) != (n_output * n_examples, n_output * m):
            raise ShapeError(
                f"operator of shape {op.shape} for {n_output} outputs × ({n_examples}, {m}) examples"
            )
        self._op = op
        self.n_output = n_output
        self.n_examples = n_examples
        self.n_examples_right = m
        self.generator = generator

    @property
    def op(self) -> LinearOperator:
        return self._op

    @property
    def layer_collection(self):
        return getattr(self.generator, "layer_collection", None)

    @property
    def shape(self):
        return self.op.shape

    @property
    def dtype(self):
        return self.op.dtype

    @property
    def device(self):
        return self.op.device

    @property
    def square(self) -> bool:
        return self.n_examples == self.n_examples_right

    def size(self, *args):
        s = torch.Size((self.n_output, self.n_examples, self.n_output, self.n_examples_right))
        return s if not args else s[args[0]]

    def __repr__(self) -> str:
        c, n, _, m = self.size()
        return f"{type(self).__name__}({self.op}, [{c}, {n}, {c}, {m}])"

    def _require_square(self, what):
        if not self.square:
            raise ShapeError(
                f"{what} needs a square kernel; this one is [{self.n_output}, {self.n_examples}, "
                f"{self.n_output}, {self.n_examples_right}] (a cross-kernel)"
            )

    # ------------------------------------------------------------------ vectors
    def _flat_in(self, v, n):
        """(flat (C·n, k) tensor, how to give the result back)."""
        c = self.n_output
        if isinstance(v, FVector):
            flat = flat_fvector(v, c, n)
            return flat[:, None], lambda y, rows: FVector(y[:, 0].view(c, rows))
        if not torch.is_tensor(v):
            raise ArgumentTypeError(f"expected an FVector or a tensor, got {type(v).__name__}")
        if v.dim() == 2 and tuple(v.shape) == (c, n):  # the (C, N) vector form
            return v.reshape(-1, 1), lambda y, rows: y[:, 0].view(c, rows)
        if v.dim() == 1 and v.shape[0] == c * n:
            return v[:, None], lambda y, rows: y[:, 0]
        if v.dim() == 2 and v.shape[0] == c * n:
            return v, lambda y, rows: y
        raise ShapeError(
            f"function-space operand of shape {tuple(v.shape)}: expected ({c}, {n}), ({c * n},) "
            f"or ({c * n}, k)"
        )

    def mv(self, v):
        """K v (FVector → FVector, (C, N) → (C, N), flat → flat)."""
        flat, back = self._flat_in(v, self.n_examples_right)
        return back(self.op @ flat, self.n_examples)

    def __matmul__(self, other):
        if isinstance(other, FMatAbstract):
            return FMatExpr(
                self.op @ other.op,
                self.n_output,
                self.n_examples,
                self.generator,
                other.n_examples_right,
            )
        if isinstance(other, PFMap):
            return PFMapExpr(
                other.layer_collection,
                self.op @ other.op,
                other.n_output,
                self.n_examples,
                self.generator,
            )
        if isinstance(other, LinearOperator):
            return self.op @ other
        return self.mv(other)

    def vTMv(self, v) -> torch.Tensor:
        flat, _ = self._flat_in(v, self.n_examples)
        self._require_square("vTMv")
        return (flat * (self.op @ flat)).sum()

    def solve(self, v, regul: float = 1e-8):
        """(K + regul·I)⁻¹ v for an FVector / tensor, or an FMat (column by column)."""
        self._require_square("solve")
        if isinstance(v, FMatAbstract):
            x = self._damped(regul).solve(v.op.to_dense())
            return FMatDense(self.generator, data=x.view(v.size()), psd=False)
        flat, back = self._flat_in(v, self.n_examples)
        return back(self._damped(regul).solve(flat), self.n_examples)

    solveFVec = solve

    def _damped(self, regul) -> LinearOperator:
        check_regul(regul)
        if regul is None or (isinstance(regul, numbers.Number) and regul == 0):
            return self.op
        return self.op + regul * Identity(self.op.shape[0], dtype=self.dtype, device=self.device)

    def inverse(self, regul: float = 1e-8) -> FMatExpr:
        """(K + regul·I)⁻¹, lazily."""
        self._require_square("inverse")
        return FMatExpr(self._damped(regul).inv(), self.n_output, self.n_examples, self.generator)

    inv = inverse

    def pow(self, p: float, regul: float = 0.0) -> FMatExpr:
        self._require_square("pow")
        return FMatExpr(self._damped(regul).pow(p), self.n_output, self.n_examples, self.generator)

    def add_identity(self, regul: float) -> FMatExpr:
        self._require_square("add_identity")
        return FMatExpr(self._damped(regul), self.n_output, self.n_examples, self.generator)

    # ------------------------------------------------------------------ quantities
    def trace(self) -> torch.Tensor:
        self._require_square("trace")
        return self.op.trace()

    def diag(self) -> torch.Tensor:
        """The diagonal K[c, n, c, n] as a (C, N) tensor."""
        self._require_square("diag")
        return self.op.diag().view(self.n_output, self.n_examples)

    get_diag = diag

    def frobenius_norm(self) -> torch.Tensor:
        return self.op.frobenius_norm()

    def norm(self, ord=None) -> torch.Tensor:
        if ord is None or ord == "fro":
            return self.frobenius_norm()
        raise InvalidArgumentError(f"norm order {ord!r} is not supported (use 'fro')")

    def eigh(self):
        """The eigendecomposition as an ops ``Eigen`` node."""
        self._require_square("eigh")
        return self.op.eigh()

    def compute_eigendecomposition(self, impl: str = "eigh") -> None:
        """NNGeometry-compatible: sets ``evals`` (ascending) and ``evecs`` (columns, (C·N, C·N))."""
        if impl != "eigh":
            raise InvalidArgumentError(f"impl must be 'eigh', got {impl!r}")
        e = self.eigh()
        evals, q = e.evals, e.Q.to_dense()
        order = torch.argsort(evals)
        self.evals, self.evecs = evals[order], q[:, order]

    def get_eigendecomposition(self):
        if not hasattr(self, "evals"):
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def to_torch(self) -> torch.Tensor:
        """The dense [C, N, C, M] tensor."""
        return self.op.to_dense().view(self.size())

    get_dense_tensor = to_torch

    def to_scipy(self):
        return self.op.to_scipy()

    # ------------------------------------------------------------------ arithmetic
    def _same(self, other):
        if not isinstance(other, FMatAbstract) or other.size() != self.size():
            raise ShapeError(
                f"cannot combine a function-space matrix of size {tuple(self.size())} with "
                f"{getattr(other, 'size', lambda: type(other).__name__)()}"
            )

    def __add__(self, other):
        self._same(other)
        return FMatExpr(
            self.op + other.op,
            self.n_output,
            self.n_examples,
            self.generator,
            self.n_examples_right,
        )

    def __sub__(self, other):
        self._same(other)
        return FMatExpr(
            self.op - other.op,
            self.n_output,
            self.n_examples,
            self.generator,
            self.n_examples_right,
        )

    def __mul__(self, x):
        if not is_scalar(x):
            return NotImplemented
        return FMatExpr(
            x * self.op, self.n_output, self.n_examples, self.generator, self.n_examples_right
        )

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1.0

    def __truediv__(self, x):
        return self * (1.0 / x)

    @property
    def T(self):
        return FMatExpr(
            self.op.T, self.n_output, self.n_examples_right, self.generator, self.n_examples
        )

    adjoint = T.fget


class FMatExpr(FMatAbstract):
    """Any ops expression in function space (results of ``+``, ``*``, ``inverse``, pushforwards)."""

    def __init__(self, op, n_output, n_examples, generator=None, n_examples_right=None):
        super().__init__(op, n_output, n_examples, generator, n_examples_right)


class FMatDense(FMatAbstract):
    """The NTK stored densely, ``data`` of shape [C, N, C, M] (M = N except for cross-kernels).

    Build with :func:`GramMatrix` / :func:`CrossGramMatrix`, or ``FMatDense(generator,
    examples=loader)`` from a :class:`JacobianGenerator`, or ``FMatDense(data=tensor)``. ``op`` is a
    ``Dense`` node, tagged symmetric PSD for a Gram matrix: ``psd=None`` means "square data is a
    Gram matrix" (NNGeometry's meaning of FMatDense); pass ``psd=False`` for other matrices.
    """

    def __init__(self, generator=None, data=None, examples=None, examples_right=None, psd=None):
        if data is None:
            if generator is None or examples is None:
                raise ArgumentTypeError(
                    "FMatDense needs data=[C, N, C, N] or a generator and examples"
                )
            if examples_right is None:
                data = kernel_tensor(generator, examples)
            else:
                data = cross_kernel_tensor(generator, examples, examples_right)
        if data.dim() != 4 or data.shape[0] != data.shape[2]:
            raise ShapeError(f"FMatDense data must be [C, N, C, M], got {tuple(data.shape)}")
        self.data = data
        c, n, _, m = data.shape
        flat = data.reshape(c * n, c * m)
        if psd is None:
            psd = n == m and examples_right is None
        if psd:
            op = Dense(flat, symmetric=True, psd=True, name="K")
        else:
            op = Dense(flat, symmetric=False, name="K×")
        super().__init__(op, c, n, generator, m)

    def to_torch(self) -> torch.Tensor:
        return self.data

    get_dense_tensor = to_torch

    def diag(self) -> torch.Tensor:
        self._require_square("diag")
        c, n = self.n_output, self.n_examples
        return self.data.reshape(c * n, c * n).diagonal().view(c, n)

    get_diag = diag

    def trace(self) -> torch.Tensor:
        """``tr K = Σ_{o,i} K[o, i, o, i]`` of a square kernel, a 0-dim tensor."""
        return self.diag().sum()

    def frobenius_norm(self) -> torch.Tensor:
        """``‖K‖_F`` over all ``C·N·C·M`` entries, a 0-dim tensor."""
        return torch.linalg.vector_norm(self.data)

    def mm(self, other: FMatAbstract) -> FMatDense:
        """The product ``K·K'`` of two function-space matrices as an ``FMatDense`` of shape
        ``[C, N, C, M']`` (``K`` flattened to ``(C·N, C·N)``, ``K'`` to ``(C·N, C·M')``), not tagged PSD.
        """
        c, n, _, m = self.size()
        return FMatDense(
            self.generator,
            data=(self.op.M @ other.op.to_dense()).view(c, n, c, other.n_examples_right),
            psd=False,
        )

    def __add__(self, other):
        if isinstance(other, FMatDense) and other.size() == self.size():
            psd = self.op.psd and other.op.psd
            return FMatDense(self.generator, data=self.data + other.data, psd=psd)
        return super().__add__(other)

    def __sub__(self, other):
        if isinstance(other, FMatDense) and other.size() == self.size():
            return FMatDense(self.generator, data=self.data - other.data, psd=False)
        return super().__sub__(other)

    def __mul__(self, x):
        if not is_scalar(x):
            return NotImplemented
        return FMatDense(self.generator, data=x * self.data, psd=self.op.psd and float(x) >= 0)

    __rmul__ = __mul__


class FMatImplicit(FMatAbstract):
    """The NTK known by its products, K V = J (Jᵀ V): ``op`` is a batched ``MatFree`` ``J·Jᵀ``.

    Nothing of size (C·N)² is stored; each product costs one reverse-mode and one forward-mode pass
    over the loader. ``diag()`` and ``trace()`` are exact, from one pass of per-example Jacobian
    norms; ``solve`` uses CG (the node is tagged PSD), ``eigh`` is best replaced by
    ``nngeo_ops.linalg.lanczos(K.op, k)`` for the top of the spectrum.
    """

    def __init__(self, generator, data=None, examples=None):
        if data is not None:
            raise ArgumentTypeError("FMatImplicit holds no data; use FMatDense")
        if examples is None:
            raise ArgumentTypeError("FMatImplicit needs examples (a loader)")
        self.examples = as_loader(examples, reiterable=True)  # read again at every product
        self.jacobian = jacobian_op(generator, self.examples)
        j = self.jacobian

        def matmat(v):
            return j._matmat(j._rmatmat(v))

        n = j.shape[0]
        op = MatFree(
            matmat,
            (n, n),
            dtype=j.dtype,
            device=j.device,
            symmetric=True,
            psd=True,
            batched=True,
            name="J·Jᵀ",
        )
        self._diag = None
        super().__init__(op, j.n_output, j.n_examples, generator)

    def diag(self) -> torch.Tensor:
        if self._diag is None:
            # per-example norms come from the live model; products from the parameters of
            # construction: refuse to mix them
            if not torch.equal(self.generator.current_flat(), self.jacobian.fm.flat0):
                raise DataError(
                    "the model's parameters changed since this kernel was built; build a new one"
                )
            self._diag = kernel_diag(self.generator, self.examples)
        return self._diag

    get_diag = diag

    def trace(self) -> torch.Tensor:
        """``tr K = Σ_{o,i} K[o, i, o, i]``, the sum of :meth:`diag`, a 0-dim tensor."""
        return self.diag().sum()


def mapTMmap(F, J, reduction: str | None = None):
    """The pushforward J F Jᵀ of a parameter-space matrix F through a map J.

    ``F`` is a representation (anything with ``.op``, e.g. a ``PMat*``) or an ops node (P × P);
    ``J`` a :class:`Jacobian`, a :class:`PFMap` or an ops node ((C·N) × P).

    * ``reduction=None``: the lazy ops product ``J·F·Jᵀ`` ((C·N) × (C·N), tagged PSD when F is),
      wrapped as an :class:`~nngeo_ops.nn.fspace.fmat.FMatExpr` in function space when J knows C and N;
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
