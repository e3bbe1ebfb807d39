"""The finite-width neural tangent kernel (NTK) as an operator in function space.

For a model with C outputs per example and a loader of N examples, the (empirical, finite-width) NTK
is the Gram matrix of the per-example Jacobians (:mod:`nngeo_ops.nn.jacobian`):

    K[c, n, c', n'] = ⟨∂f_c(x_n)/∂θ, ∂f_c'(x_n')/∂θ⟩ = (J Jᵀ)[(c, n), (c', n')],

stored in NNGeometry's ``[C, N, C, N]`` layout; flattened, rows and columns are output-major
(index c·N + n), the order of :class:`FVector` ``(C, N)`` and of the rows of J. The parameters θ are
those of a :class:`LayerCollection` (a subset of layers gives the NTK of that subset).

Representations (``representation=`` of :func:`GramMatrix`):

* :class:`FMatDense` holds the tensor; its ``op`` is a ``Dense`` node tagged symmetric PSD, so trace,
  diagonal, eigendecomposition and damped solves go through ``ops`` (the Cholesky factor is cached on
  the node and reused across right-hand sides);
* :class:`FMatImplicit` never stores K: ``op`` is a ``MatFree`` applying K V = J (Jᵀ V) (one reverse
  and one forward pass over the loader), for Lanczos (``nngeo_ops.linalg.lanczos``), CG solves or
  ``op.to_scipy()``; its diagonal and trace are exact, from per-example Jacobian norms.

**How the Gram matrix is computed.** No Python loop over examples: the loader's batches are cut into
chunks of at most ``chunk_size`` examples, and for each chunk one forward and one backward pass with
the C unit cotangents batched (hooks of :mod:`nngeo_ops.nn.capture`) give, per layer, either the
per-example gradients or — for dense layers, and wherever it is cheaper — the Kronecker rows
(inputs a_n and output cotangents g_{c,n}) from which the layer's block of K is

    K_layer[(c, n), (c', n')] = Σ_{r, r'} (g_{c,n,r} · g_{c',n',r'}) (a_{n,r} · a_{n',r'}),

i.e. (G Gᵀ) ⊙ (A Aᵀ) for one position, without ever forming the C·N·dG·dA per-example gradients.
Blocks of K between two chunks are products of their features. With ``chunk_size=None`` the features
of every chunk are kept (one pass over the data, memory ∝ N); with a ``chunk_size`` at most two
chunks' features are alive at once, at the price of recomputing them for each pair of chunks
(n_chunks·(n_chunks + 1)/2 chunk passes): peak memory is then K itself plus two chunks' features
and the activations of one chunk. In both modes the loader is read once and its batches (the inputs,
not the Jacobians) are held until K is complete.

**Damping and kernel regression.** ``solve(v, regul=λ)`` solves (K + λI) x = v exactly as written
(NNGeometry's FMatDense scales its ``regul`` by N; here it is not). :class:`NTKRegression` gives the
predictions of the linearised network f_lin(x; θ) = f(x; θ₀) + J(x)(θ − θ₀) trained to the minimum of
Σ_n ‖f_lin(x_n) − y_n‖² + λ‖θ − θ₀‖²:

    f_lin(x*) = f(x*; θ₀) + K(x*, X) (K(X, X) + λI)⁻¹ (Y − f(X; θ₀)),

which is kernel (ridge) regression with the NTK; :func:`CrossGramMatrix` gives K(x*, X).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as Fn

from ..errors import ArgumentTypeError, DataError, InvalidArgumentError, ShapeError
from ..ops import Dense, Identity, LinearOperator, MatFree
from .jacobian import (
    BackendSwitched,
    Features,
    JacobianGenerator,
    PFMap,
    PFMapExpr,
    _batch_size,
    _fflat,
    _progress,
)
from .vector import FVector


# ---------------------------------------------------------------------- the Gram engine
def _block(fi: Features, fj: Features) -> torch.Tensor:
    """K between two chunks, (C·B_i, C·B_j), rows and columns output-major inside each chunk."""
    c, bi, bj = fi.c, fi.b, fj.b
    if fi.grads is not None:
        out = fi.grads.reshape(c * bi, -1) @ fj.grads.reshape(c * bj, -1).T
    else:
        ref = fi.krons[0][0]
        out = torch.zeros(c * bi, c * bj, dtype=ref.dtype, device=ref.device)
    o4 = out.view(c, bi, c, bj)
    for (ai, gi), (aj, gj) in zip(fi.krons, fj.krons):
        ri, rj = ai.shape[1], aj.shape[1]
        if ri == 1 and rj == 1:  # one position: (G Gᵀ) ⊙ (A Aᵀ), the A factor shared by outputs
            gg = gi.reshape(c * bi, -1) @ gj.reshape(c * bj, -1).T
            aa = ai[:, 0] @ aj[:, 0].T
            o4.addcmul_(gg.view(c, bi, c, bj), aa[None, :, None, :])
        else:
            gg = gi.reshape(c * bi * ri, -1) @ gj.reshape(c * bj * rj, -1).T
            aa = ai.reshape(bi * ri, -1) @ aj.reshape(bj * rj, -1).T
            o4 += torch.einsum(
                "cnrdms,nrms->cndm", gg.view(c, bi, ri, c, bj, rj), aa.view(bi, ri, bj, rj)
            )
    return out


def _features_diag(f: Features) -> torch.Tensor:
    """diag(K) of one chunk, (C, B): the squared norms of the per-example Jacobian rows."""
    d = f.grads.square().sum(-1) if f.grads is not None else 0.0
    for a, g in f.krons:
        if a.shape[1] == 1:
            d = d + g[:, :, 0].square().sum(-1) * a[:, 0].square().sum(-1)
        else:
            gg = torch.einsum("cbrg,cbsg->cbrs", g, g)
            aa = torch.einsum("bra,bsa->brs", a, a)
            d = d + (gg * aa).sum((-1, -2))
    return d


def _chunk_list(gen: JacobianGenerator, examples, desc):
    chunks = list(gen.chunks(examples, desc))
    if not chunks or sum(_batch_size(ch) for ch in chunks) == 0:
        raise DataError("the loader yielded no examples")
    return chunks


def _retrying(fn):
    """Run ``fn`` again (now on the func backend) if the hooks gave up after the first chunk."""

    def wrapped(*args):
        try:
            return fn(*args)
        except BackendSwitched:
            return fn(*args)

    return wrapped


@_retrying
def _gram(gen: JacobianGenerator, examples_a, examples_b=None) -> torch.Tensor:
    """K(A, B) as a [C, N_a, C, N_b] tensor (K(A, A) when ``examples_b`` is None)."""
    sym = examples_b is None
    gen.reset_plan()
    chunks_a = _chunk_list(gen, examples_a, "gram (data)")
    chunks_b = chunks_a if sym else _chunk_list(gen, examples_b, "gram (data)")
    sizes_a = [_batch_size(ch) for ch in chunks_a]
    sizes_b = [_batch_size(ch) for ch in chunks_b]
    offs_a = [sum(sizes_a[:i]) for i in range(len(sizes_a))]
    offs_b = [sum(sizes_b[:i]) for i in range(len(sizes_b))]
    keep = gen.chunk_size is None
    memo: dict = {}

    def feat(side, i):
        key = ("a" if sym else side, i)
        if key in memo:
            return memo[key]
        f = gen.features((chunks_a if key[0] == "a" else chunks_b)[i])
        want = (sizes_a if key[0] == "a" else sizes_b)[i]
        if f.b != want:
            raise ShapeError(
                f"the function returned {f.b} outputs for a chunk of {want} examples; it must "
                "return one row per example (batch first)"
            )
        if keep:
            memo[key] = f
        return f

    k4 = None
    pairs = [(i, j) for i in range(len(chunks_a)) for j in range(i if sym else 0, len(chunks_b))]
    for i, j in _progress(pairs, gen.progress, "gram"):
        fi = feat("a", i)
        fj = fi if (sym and i == j) else feat("b", j)
        if fi.c != fj.c:
            raise ShapeError(
                f"the two loaders give {fi.c} and {fj.c} outputs per example; a cross-kernel "
                "needs the same outputs on both (same model, function and output shape)"
            )
        if k4 is None:
            c = fi.c
            ref = fi.grads if fi.grads is not None else fi.krons[0][0]
            k4 = torch.zeros(c, sum(sizes_a), c, sum(sizes_b), dtype=ref.dtype, device=ref.device)
        blk = _block(fi, fj)
        if sym and i == j:
            blk = 0.5 * (blk + blk.T)  # exact symmetry of the diagonal blocks (rounding)
        blk4 = blk.view(c, fi.b, c, fj.b)
        k4[:, offs_a[i] : offs_a[i] + fi.b, :, offs_b[j] : offs_b[j] + fj.b] = blk4
        if sym and i != j:
            k4[:, offs_b[j] : offs_b[j] + fj.b, :, offs_a[i] : offs_a[i] + fi.b] = blk4.permute(
                2, 3, 0, 1
            )
    return k4


def gram_tensor(gen: JacobianGenerator, examples) -> torch.Tensor:
    """The NTK of ``examples`` as a [C, N, C, N] tensor."""
    return _gram(gen, examples)


def cross_gram_tensor(gen: JacobianGenerator, examples_a, examples_b) -> torch.Tensor:
    """The cross-kernel K(A, B) as a [C, N_a, C, N_b] tensor."""
    return _gram(gen, examples_a, examples_b)


@_retrying
def ntk_diag(gen: JacobianGenerator, examples) -> torch.Tensor:
    """diag(K) as a (C, N) tensor, from one pass and without forming K."""
    gen.reset_plan()
    parts = [_features_diag(gen.features(ch)) for ch in gen.chunks(examples, "ntk diag")]
    if not parts:
        raise DataError("the loader yielded no examples")
    if any(p.shape[0] != parts[0].shape[0] for p in parts):
        raise ShapeError("the function returned different numbers of outputs per batch")
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------- function-space matrices
def _is_scalar(x) -> bool:
    return isinstance(x, numbers.Number) or (torch.is_tensor(x) and x.dim() == 0)


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
            flat = _fflat(v, c, n)
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
        if not _is_scalar(x):
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
                data = gram_tensor(generator, examples)
            else:
                data = cross_gram_tensor(generator, examples, examples_right)
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
        return self.diag().sum()

    def frobenius_norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.data)

    def mm(self, other: FMatAbstract) -> FMatDense:
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
        if not _is_scalar(x):
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
        self.examples = examples
        self.jacobian = generator.jacobian_op(examples)
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
            self._diag = ntk_diag(self.generator, self.examples)
        return self._diag

    get_diag = diag

    def trace(self) -> torch.Tensor:
        return self.diag().sum()


# ---------------------------------------------------------------------- entry points
def GramMatrix(
    model,
    loader,
    function=None,
    layer_collection=None,
    representation=FMatDense,
    chunk_size: int | None = None,
    device=None,
    progress=None,
    backend: str = "hooks",
):
    """The finite-width NTK K[c, n, c', n'] = ⟨∂f_c(x_n)/∂θ, ∂f_c'(x_n')/∂θ⟩ of ``model`` on ``loader``.

    Args:
        model: the network; ``function(*batch) -> (B, *S)`` (default ``model(batch[0])``) selects
            the outputs (flattened to C = prod(S) per example).
        loader: an iterable of batches (tuples, inputs first), or one batch.
        layer_collection: θ, a :class:`LayerCollection` of ``model`` (default: all trainable
            parameters); a subset of layers gives the NTK of that subset.
        representation: :class:`FMatDense` (the [C, N, C, N] tensor) or :class:`FMatImplicit`.
        chunk_size: examples per chunk when materialising per-example Jacobians (see the module
            docstring for the memory / recomputation trade-off).
        device, progress: where batches go; progress bars (None: on a terminal only).
        backend: ``"hooks"`` (default, structured) or ``"func"`` (torch.func per-example
            Jacobians of each chunk, then matrix products).
    """
    gen = JacobianGenerator(
        model, function, layer_collection, chunk_size, device, progress, backend
    )
    return representation(generator=gen, examples=loader)


def CrossGramMatrix(
    model,
    loader_left,
    loader_right,
    function=None,
    layer_collection=None,
    chunk_size: int | None = None,
    device=None,
    progress=None,
    backend: str = "hooks",
) -> FMatDense:
    """The cross-kernel K(X_left, X_right)[c, n, c', m] = ⟨∂f_c(x_n)/∂θ, ∂f_c'(x'_m)/∂θ⟩.

    Returns an :class:`FMatDense` of size [C, N_left, C, N_right] (e.g. test × train for the
    predictions of the linearised model). Both loaders must give the same number of outputs C.
    """
    gen = JacobianGenerator(
        model, function, layer_collection, chunk_size, device, progress, backend
    )
    return FMatDense(gen, examples=loader_left, examples_right=loader_right)


def _targets_from(gen: JacobianGenerator, loader, c: int, n: int) -> torch.Tensor:
    """Regression targets (C, N) from the loader's second batch entry (class labels one-hot)."""
    parts = []
    for chunk in gen.chunks(loader, "targets"):
        if len(chunk) < 2 or not torch.is_tensor(chunk[1]):
            raise DataError(
                "kernel regression needs targets: the loader must yield (inputs, targets) or "
                "targets=... must be given"
            )
        y, b = chunk[1], _batch_size(chunk)
        if not y.is_floating_point():
            if c == 1:
                raise DataError(
                    "integer targets with one output: give float targets (B,) or (B, 1)"
                )
            if y.dim() != 1:
                raise ShapeError(f"class labels of shape {tuple(y.shape)}; expected ({b},)")
            y = Fn.one_hot(y.long(), c)
        parts.append(y.reshape(b, -1).to(gen.dtype))
    y = torch.cat(parts, dim=0)
    if tuple(y.shape) != (n, c):
        raise ShapeError(f"targets of shape {tuple(y.shape)} for {n} examples with {c} outputs")
    return y.T


class NTKRegression:
    """Kernel ridge regression with the finite-width NTK = the trained linearised network.

    With f₀ = f(·; θ₀) the model at its current parameters, Y the targets (C, N) and λ = ``regul``:

        α = (K + λI)⁻¹ (Y − f₀(X)),     f_lin(x*) = f₀(x*) + K(x*, X) α,

    the minimiser of Σ_n ‖f₀(x_n) + J(x_n) δ − y_n‖² + λ‖δ‖² being δ = Jᵀ α (so that
    f_lin(x*) = f₀(x*) + J(x*) δ). With ``centered=False`` f₀ is dropped (plain kernel regression
    K(x*, X)(K + λI)⁻¹ Y).

    Args:
        targets: (N, C) tensor or :class:`FVector` (C, N); default: the loader's second entry
            (float targets (B, *S), or integer class labels, one-hot encoded).
        representation: :class:`FMatDense` (Cholesky of K + λI, cached) or :class:`FMatImplicit`
            (CG with implicit products, for N·C too large to store).
        Other arguments as :func:`GramMatrix`.

    Attributes:
        K: the train kernel; ``alpha``: (C, N) dual coefficients; ``jacobian``: the train
        :class:`~nngeo_ops.nn.jacobian.Jacobian` node; ``outputs``: f₀(X) (C, N).
    """

    def __init__(
        self,
        model,
        train_loader,
        targets=None,
        regul: float = 1e-6,
        function=None,
        layer_collection=None,
        representation=FMatDense,
        centered: bool = True,
        chunk_size: int | None = None,
        device=None,
        progress=None,
        backend: str = "hooks",
    ):
        if not (_is_scalar(regul) and float(regul) >= 0):
            raise InvalidArgumentError(f"regul must be a non-negative number, got {regul!r}")
        self.generator = gen = JacobianGenerator(
            model, function, layer_collection, chunk_size, device, progress, backend
        )
        self.train_loader = train_loader
        self.regul = regul
        self.centered = centered
        self.K = representation(generator=gen, examples=train_loader)
        self.jacobian = (
            self.K.jacobian if isinstance(self.K, FMatImplicit) else gen.jacobian_op(train_loader)
        )
        c, n = self.jacobian.n_output, self.jacobian.n_examples
        if isinstance(targets, FVector):
            y = targets.to_torch()
        elif targets is None:
            y = _targets_from(gen, train_loader, c, n)
        elif torch.is_tensor(targets):
            if targets.dim() == 0 or targets.shape[0] != n or targets[0].numel() != c:
                raise ShapeError(f"targets of shape {tuple(targets.shape)}; expected ({n}, {c})")
            y = targets.reshape(n, c).T
        else:
            raise ArgumentTypeError(
                f"targets must be a tensor or an FVector, got {type(targets).__name__}"
            )
        if tuple(y.shape) != (c, n):
            raise ShapeError(f"targets of shape {tuple(y.shape)}; expected (C, N) = ({c}, {n})")
        self.outputs = self.jacobian.outputs
        resid = y.to(self.outputs.dtype) - (self.outputs if centered else 0.0)
        self.alpha = self.K.solve(resid, regul=regul)

    @property
    def delta(self):
        """δ = θ_lin − θ₀ = Jᵀ α, the parameter displacement of the trained linearised model."""
        return self.jacobian.vjp(self.alpha)

    def predict(self, test_loader, method: str | None = None) -> torch.Tensor:
        """Predictions f_lin(x*) on ``test_loader``, shape (N*, C).

        ``method="kernel"`` goes through the cross-kernel K(x*, X) (default for FMatDense);
        ``"primal"`` through f₀(x*) + J(x*) (Jᵀ α), one VJP and one JVP, never forming a kernel
        (default for FMatImplicit). Both give the same numbers up to rounding.
        """
        if method is None:
            method = "primal" if isinstance(self.K, FMatImplicit) else "kernel"
        if method not in ("kernel", "primal"):
            raise InvalidArgumentError(f"method must be 'kernel' or 'primal', got {method!r}")
        jt = self.generator.jacobian_op(test_loader, name="J*")
        if jt.n_output != self.jacobian.n_output:
            raise ShapeError(
                f"the test loader gives {jt.n_output} outputs per example, the train loader "
                f"{self.jacobian.n_output}"
            )
        f0 = jt.outputs if self.centered else torch.zeros_like(jt.outputs)
        if method == "kernel":
            kx = cross_gram_tensor(self.generator, test_loader, self.train_loader)
            c, m = jt.n_output, jt.n_examples
            pred = f0.reshape(-1) + kx.reshape(c * m, -1) @ self.alpha.reshape(-1)
        else:
            pred = f0.reshape(-1) + jt @ self.jacobian.T @ self.alpha.reshape(-1)
        return pred.view(jt.n_output, jt.n_examples).T


def kernel_regression(
    model, train_loader, test_loader, targets=None, regul: float = 1e-6, **kwargs
):
    """Predictions (N*, C) of the linearised network by NTK ridge regression (see :class:`NTKRegression`)."""
    method = kwargs.pop("method", None)
    return NTKRegression(model, train_loader, targets=targets, regul=regul, **kwargs).predict(
        test_loader, method=method
    )
