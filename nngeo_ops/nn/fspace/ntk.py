"""The finite-width neural tangent kernel (NTK) as an operator in function space.

For a model with C outputs per example and a loader of N examples, the (empirical, finite-width) NTK
is the Gram matrix of the per-example Jacobians (:mod:`nngeo_ops.nn.fspace.jacobian`):

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
the C unit cotangents batched (hooks of :mod:`nngeo_ops.nn.engine.capture`) give, per layer, either the
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

import torch
import torch.nn.functional as Fn

from ...errors import ArgumentTypeError, DataError, InvalidArgumentError, ShapeError
from ...ops.base import is_scalar
from ..data import as_loader, batch_size_of
from ..engine.jacobian_generator import JacobianGenerator
from ..engine.ntk import cross_kernel_tensor
from ..params import FVector
from .fmat import FMatDense, FMatImplicit
from .jacobian import jacobian_op


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
    max_batches: int | None = None,
    process_group=None,
):
    """The finite-width NTK K[c, n, c', n'] = ⟨∂f_c(x_n)/∂θ, ∂f_c'(x_n')/∂θ⟩ of ``model`` on ``loader``.

    Args:
        model: the network; ``function(*batch) -> (B, *S)`` (default ``model(batch[0])``) selects
            the outputs (flattened to C = prod(S) per example).
        loader: an iterable of batches (tuples, inputs first), or one batch: a tuple / list of
            tensors whose first dimensions agree (the rule of :mod:`nngeo_ops.nn.data`).
        layer_collection: θ, a :class:`LayerCollection` of ``model`` (default: all trainable
            parameters); a subset of layers gives the NTK of that subset.
        representation: :class:`FMatDense` (the [C, N, C, N] tensor) or :class:`FMatImplicit`.
        chunk_size: examples per chunk when materialising per-example Jacobians (see the module
            docstring for the memory / recomputation trade-off).
        device, progress: where batches go; progress bars (None: on a terminal only).
        backend: ``"hooks"`` (default, structured) or ``"func"`` (torch.func per-example
            Jacobians of each chunk, then matrix products).
        max_batches: read only the first ``max_batches`` batches (a streaming loader).
        process_group: in a ``torch.distributed`` group (the default one when initialised; False:
            local) each rank passes its shard and gets the [C, N, C, N] kernel of the union of the
            shards, examples in rank order, replicated (:func:`~nngeo_ops.nn.engine.ntk.sharded_kernel`).
    """
    loader = as_loader(loader, max_batches=max_batches)
    gen = JacobianGenerator(
        model, function, layer_collection, chunk_size, device, progress, backend, process_group
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
    process_group=None,
) -> FMatDense:
    """The cross-kernel K(X_left, X_right)[c, n, c', m] = ⟨∂f_c(x_n)/∂θ, ∂f_c'(x'_m)/∂θ⟩.

    Returns an :class:`FMatDense` of size [C, N_left, C, N_right] (e.g. test × train for the
    predictions of the linearised model). Both loaders must give the same number of outputs C.
    In a process group both loaders are sharded and the gathered kernel is replicated.
    """
    gen = JacobianGenerator(
        model, function, layer_collection, chunk_size, device, progress, backend, process_group
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
        y, b = chunk[1], batch_size_of(chunk)
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
            (float targets ``(B, *S)``, or integer class labels, one-hot encoded).
        representation: :class:`FMatDense` (Cholesky of K + λI, cached) or :class:`FMatImplicit`
            (CG with implicit products, for N·C too large to store).

    Other arguments as :func:`GramMatrix`.

    Attributes:
        K: the train kernel.
        alpha: (C, N) dual coefficients.
        jacobian: the train :class:`~nngeo_ops.nn.fspace.jacobian.Jacobian` node.
        outputs: f₀(X) (C, N).
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
        if not (is_scalar(regul) and float(regul) >= 0):
            raise InvalidArgumentError(f"regul must be a non-negative number, got {regul!r}")
        self.generator = gen = JacobianGenerator(
            model, function, layer_collection, chunk_size, device, progress, backend
        )
        self.train_loader = train_loader
        self.regul = regul
        self.centered = centered
        self.K = representation(generator=gen, examples=train_loader)
        self.jacobian = (
            self.K.jacobian if isinstance(self.K, FMatImplicit) else jacobian_op(gen, train_loader)
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
        jt = jacobian_op(self.generator, test_loader, name="J*")
        if jt.n_output != self.jacobian.n_output:
            raise ShapeError(
                f"the test loader gives {jt.n_output} outputs per example, the train loader "
                f"{self.jacobian.n_output}"
            )
        f0 = jt.outputs if self.centered else torch.zeros_like(jt.outputs)
        if method == "kernel":
            kx = cross_kernel_tensor(self.generator, test_loader, self.train_loader)
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
