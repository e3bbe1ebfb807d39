"""The implicit GGN / Fisher as the ops expression ``Jᵀ·H·J``, and the implicit Hessian.

For a loader of N examples, a model with outputs f(x_n) of C entries each and the output model's
factor L_n (the loss Hessian in output space is L_n L_nᵀ for the GGN; a Monte-Carlo or empirical
factor for the Fisher variants), the matrix is

    M = Jᵀ · H · J,      H = s · blockdiag_n(L_n L_nᵀ),

with J the per-example Jacobian (:class:`~nngeo_ops.nn.fspace.jacobian.Jacobian`, (C·N) × P, rows
output-major: row = c·N + n) and s = 1/(number of examples, or of counted targets) for a ``mean``
reduction, 1 for ``sum``. H is an output-space node in the same row order (:class:`OutputCurvature`).

:class:`GaussNewton` is a ``Product`` of exactly these three factors, so ``str``, ``simplify`` and
``explain`` see ``Jᵀ·H·J`` and every rule on products applies. Its own products do not evaluate the
factors one after the other (a forward-mode pass for J, a pass for H, a reverse-mode pass for Jᵀ):
they run the fused per-batch path of :mod:`nngeo_ops.nn.engine.functional` (one forward pass carrying the
tangent, the output factor, one backward), or with ``cache=True`` two backward passes over the kept
linearisation of each batch. Once a rewrite changes the factors (e.g. ``J @ F.op @ J.T`` flattens into
a longer product) the result is a plain ``Product`` evaluated factor by factor; both agree.

The operator is the curvature **at the parameters of construction**, as every other representation
is (a dense Fisher is computed once; an EWC penalty wants the Fisher at the old optimum): J, H and the
fused path share one snapshot of the covered parameters, so later updates of the model do not change
the operator — build a new one for the new parameters. The loader must yield the same examples in the
same order at every pass; the Jacobian checks this.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ...errors import UnsupportedError
from ...ops import LinearOperator, MatFree, Product
from ...ops.registry import rule
from ..data import ReplayCheck, as_loader
from ..engine import functional as fx
from ..engine.accumulators import DiagAcc
from ..engine.capture import batch_labels, output_factor, output_hessian
from ..engine.curvature_generator import CurvatureGenerator
from ..engine.distributed import ConsistentProduct
from ..engine.finite import check_product
from ..engine.jacobian_generator import JacobianGenerator
from ..fspace.jacobian import Jacobian


class _OutputCurvature:
    """The output model's curvature for the generator's kind, on one batch's outputs.

    ``self(out, batch) -> (L, count)``, the factor (K, B, *out); ``hessian(out, batch) -> (h,
    count)`` with ``h(U) = L Lᵀ U`` for U (k, B, *out), which for the exact kind is the output
    model's closed form (a softmax's p ⊙ u − p (pᵀu): three elementwise passes where forming the
    C − 1 columns of L and contracting with them takes ~4× as long, 4 % of the benchmark MLP's
    product), the outputs checked and read once. Monte-Carlo labels are drawn from ``rng`` by
    either call, once per batch.
    """

    def __init__(self, gen, rng):
        self.gen, self.rng = gen, rng

    def __call__(self, out, batch):
        gen = self.gen
        y = batch_labels(batch)
        return output_factor(gen.output_model, gen.kind, out, y, gen.n_output, gen.trials, self.rng)

    def hessian(self, out, batch):
        gen = self.gen
        y = batch_labels(batch)
        return output_hessian(
            gen.output_model, gen.kind, out, y, gen.n_output, gen.trials, self.rng
        )


class ImplicitProducts:
    """The products of the implicit GGN / Fisher / Hessian of a generator over ``examples``.

    Without a cache each product makes one pass over ``examples`` (a forward pass carrying the
    tangent, then a backward pass, per batch). With ``cache=True`` the first product takes the
    batches once and linearises each (:class:`~nngeo_ops.nn.engine.functional.Linearised`: its output, its
    reverse graph and the graph of Jᵀu, or the graph of the loss gradient for the Hessian); every
    later product is then two backward passes per batch over the kept graphs — the operator is
    applied many times by CG, Lanczos or Hutchinson, and this is where the time goes. The cache
    holds the activations of every batch (memory like keeping the whole loader's forward graphs;
    of the backward graphs only what J V reads, see :mod:`~nngeo_ops.nn.engine.saved`) and is
    freed by :meth:`clear`.

    The parameters are those at construction (``self.fm`` keeps a copy). For the Monte-Carlo Fisher
    the labels are redrawn at each product from a generator re-seeded with the same seed (drawn
    once, with the cache), so the operator is fixed as long as the loader yields the same batches in
    the same order.
    """

    def __init__(self, gen, examples, cache: bool = False):
        self.gen, self.cache = gen, bool(cache)
        self.examples = as_loader(examples, reiterable=True)  # read again at every product
        self.replay = ReplayCheck()  # every pass must read the batches of the first one
        self.fm = gen.flat_model()  # the snapshot of the covered parameters
        self._lin = None
        self.seed = None
        if gen.kind == "sample":
            self.seed = int(torch.randint(0, 2**62, (1,), generator=gen.rng).item())
        # in a process group: the product is the all-reduce of the per-shard products
        self._group = ConsistentProduct(gen.process_group) if gen.process_group else None

    def clear(self) -> None:
        """Free the linearised batches (the next product rebuilds them)."""
        if self._lin is not None:
            self.replay.settle()  # the fingerprints of the batches the cache held
        self._lin = None

    def factor(self, rng):
        """``factor(out, batch) -> (L, count)``: the output model's factor for the kind, with its
        ``apply(out, batch, U) -> (L Lᵀ U, count)`` (see :class:`_OutputCurvature`)."""
        return _OutputCurvature(self.gen, rng)

    def rng(self):
        """A fresh generator with the operator's seed (Monte-Carlo kinds), else None."""
        return torch.Generator().manual_seed(self.seed) if self.seed is not None else None

    def _linearised(self, first=None):
        """The linearised batches (built at the first call). ``first`` (P, 1): build them with the
        product by it (:class:`~nngeo_ops.nn.engine.functional.Linearised`), returned with the list
        (else None): the first product of a cached operator costs one uncached product."""
        if self._lin is not None:
            return self._lin, None
        gen, rng = self.gen, self.rng()
        lin, acc, total, nb = [], None, 0, 0
        # the cache holds the batches: their fingerprints wait for clear(), which drops them
        for batch in self.replay.check(gen._batches(self.examples, "linearise"), held=True):
            if gen.kind == "hessian":
                lin.append(fx.Linearised(self.fm, batch, loss=gen._loss))
                continue
            part = fx.Linearised(self.fm, batch, factor=self.factor(rng), first=first)
            lin.append(part)
            if first is not None:
                hv = part.first if part.first is not None else part.matmat(first)
                acc = _add(acc, hv.to(gen.dtype))
                total, nb = total + part.count, nb + 1
        self._lin = lin
        # one batch: the sum is that batch's Jᵀu, a view of its cached graph's value, which no
        # later product reads (they differentiate through the graph): owned, scaled in place
        # instead of into a fresh P-sized tensor, whose pages the first touch faults in
        return lin, (None if first is None else (acc, total, nb, first))

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """M V for V of shape (P, k) (summed in the operator's dtype, run in the model's);
        NonFiniteError (naming the layers) if M V of a finite V is not finite."""
        out = self._matmat(v)
        what = "the Hessian product" if self.gen.kind == "hessian" else "the implicit product"
        check_product(out, v, self.gen.layer_collection, what)
        return out

    def _matmat(self, v: torch.Tensor) -> torch.Tensor:
        gen = self.gen
        acc, total, nb = None, 0, 0
        v = v.to(gen.model_dtype)  # a half model runs in half; its products are summed in float32
        if self.cache:
            # one column that no graph needs to reach: the first product builds the cache
            fuse = v.shape[1] == 1 and gen.kind != "hessian"
            fuse = fuse and not (torch.is_grad_enabled() and v.requires_grad)
            lins, done = self._linearised(v if fuse else None)
            if done is not None:
                return self._scaled(*done)
            for lin in lins:
                acc, total, nb = _add(acc, lin.matmat(v).to(gen.dtype)), total + lin.count, nb + 1
            return self._scaled(acc, total, nb, v)
        rng = self.rng()
        for batch in self.replay.check(gen._batches(self.examples, "implicit product")):
            if gen.kind == "hessian":
                hv, count = fx.hessian_matmat(self.fm, batch, gen._loss, v)
            else:
                hv, count = fx.ggn_matmat(self.fm, batch, self.factor(rng), v)
            acc, total, nb = _add(acc, hv.to(gen.dtype)), total + count, nb + 1
        return self._scaled(acc, total, nb, v)

    def _scaled(self, acc, total, nb, v):
        # ``acc`` is the caller's own (a fresh sum, or the first product's Jᵀu value, which no
        # later product reads): scaled in place when no graph needs it (a P-sized allocation less
        # per product), and all-reduced in place
        if acc is None:  # no batch (an empty shard of a process group)
            acc = torch.zeros_like(v, dtype=self.gen.dtype)
        if self._group is None:
            s = self.gen._finish(total, nb)
        else:
            acc, (total, nb) = self._group.reduce(acc, v, [total, nb])
            s = self.gen._finish(total, nb, reduced=True)
        if not acc.requires_grad:
            return acc.mul_(s)
        return acc * s


def _add(acc, part):
    # the first batch's product is the sum so far: no P-sized zeros and addition per product; a
    # (P, 1) column of a (1, P) gradient keeps the strides (1, P): give it row-major ones (a view)
    if acc is None:
        return part.reshape(-1).view(part.shape) if part.is_contiguous() else part.contiguous()
    return acc + part


class OutputCurvature(MatFree):
    """H = s · blockdiag_n(L_n L_nᵀ) in function space, (C·N) × (C·N), rows output-major.

    L_n is the factor the fused GGN path uses for example n (same output model, kind, Monte-Carlo
    seed and batches, read through the Jacobian's checked pass, so that a reshuffled loader raises),
    so ``Jᵀ @ (H @ (J @ v))`` equals the fused product. Each product makes one
    forward pass without gradient over the loader, to get the outputs the factor depends on (and
    the labels of the batches); nothing of size (C·N)² is stored.
    """

    def __init__(self, products: ImplicitProducts, jacobian: Jacobian):
        self.products, self.jacobian = products, jacobian
        self.n_output, self.n_examples = jacobian.n_output, jacobian.n_examples
        gen = products.gen
        m = self.n_output * self.n_examples
        super().__init__(
            self._apply_h,
            (m, m),
            dtype=gen.dtype,
            device=gen.device,
            symmetric=True,
            psd=True,
            batched=True,
            name="H",
        )

    def _apply_h(self, u: torch.Tensor) -> torch.Tensor:
        prod, gen = self.products, self.products.gen
        c, n, k = self.n_output, self.n_examples, u.shape[1]
        u3 = u.reshape(c, n, k)
        factor = prod.factor(prod.rng())
        parts, start, total, nb = [], 0, 0, 0
        # the Jacobian's checked pass: the batches J's rows were built from, or DataError
        for batch in self.jacobian._pass("output curvature"):
            with torch.no_grad():
                out = prod.fm(prod.fm.flat0, batch)
            b = out.shape[0]
            ub = u3[:, start : start + b, :].permute(2, 1, 0).reshape(k, *out.shape)
            h, count = factor.hessian(out, batch)  # the closed form where there is one
            parts.append(h(ub).reshape(k, b, c))
            start, total, nb = start + b, total + count, nb + 1
        hu = torch.cat(parts, dim=1) * gen._finish(total, nb)  # (k, N, C)
        return hu.permute(2, 1, 0).reshape(c * n, k)


class GaussNewton(Product):
    """``Jᵀ·H·J`` (factors: ``J.T``, an :class:`OutputCurvature` H, the :class:`Jacobian` J) whose
    products take the fused per-batch path of :class:`ImplicitProducts` (see the module docstring).

    Symmetric PSD. ``products`` holds the fused path and its cache. The factors are built at first
    use (``factors``, ``J``, ``H``, or any compilation that walks the tree): building J costs a
    pass over the loader (its size, outputs and fingerprints), which products do not need. They are
    linearised at the same parameter snapshot as the fused path, whenever they are built.
    """

    def __init__(self, gen, examples, products: ImplicitProducts) -> None:
        p = gen.layer_collection.numel()
        LinearOperator.__init__(self, (p, p), gen.dtype, gen.device, symmetric=True, psd=True)
        self.gen, self.examples, self.products = gen, examples, products
        self._built = None

    @property
    def factors(self) -> tuple:
        if self._built is None:
            gen = self.gen
            with warnings.catch_warnings():  # the curvature generator has warned about BatchNorm
                warnings.simplefilter("ignore", UserWarning)
                jgen = JacobianGenerator(
                    gen.model,
                    gen.function,
                    gen.layer_collection,
                    device=gen.device,
                    progress=gen.progress,
                )
            J = Jacobian(generator=jgen, loader=self.examples, params=self.products.fm.flat0)
            H = OutputCurvature(self.products, J)
            self._built = (J.T, H, J)
        return self._built

    @property
    def J(self) -> Jacobian:
        return self.factors[2]

    @property
    def H(self) -> OutputCurvature:
        return self.factors[1]

    def _rebuild(self, **fields: Any) -> Product:
        factors = fields.get("factors", self.factors)
        if len(factors) == 3 and all(a is b for a, b in zip(factors, self.factors)):
            return self
        return Product(*factors)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.products.matmat(X)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.products.matmat(X)

    def _str(self) -> str:
        return "Jᵀ·H·J"


@rule("diag", GaussNewton, name="per-example gradients of the hook engine (exact)")
def gauss_newton_diag(node: GaussNewton, ctx):
    """diag(JᵀHJ) = s·Σ_n Σ_k (J_nᵀ L_{n,k})², one pass of the statistics engine (PMatDiag's).

    Only where that pass computes the same matrix: the exact and empirical kinds (a Monte-Carlo
    operator's labels are its own) and the parameters of the snapshot (the engine reads the model).
    """
    gen, products = node.gen, node.products
    current = gen.layer_collection.flat_parameters(gen.model)
    if gen.kind not in ("exact", "empirical") or not torch.equal(current, products.fm.flat0):
        return None
    try:
        accs = [DiagAcc(gen.layer_collection.layers)]  # PMatDiag's pass
        gen.run(node.examples, accs, desc="PMatDiag")
        return accs[0].concatenated()
    except UnsupportedError:  # a model the hooks cannot follow: the generic fallbacks apply
        return None


def implicit_curvature(gen, examples, cache: bool = False) -> GaussNewton | MatFree:
    """The implicit operator of a curvature generator over ``examples``.

    GGN and Fisher kinds give a :class:`GaussNewton` ``Jᵀ·H·J``; the Hessian, which is not a
    congruence of an output-space matrix, a batched ``MatFree`` named ``∇²L`` (Hessian-vector
    products). ``op.products`` is the :class:`ImplicitProducts` in both cases.
    """
    products = ImplicitProducts(gen, examples, cache)
    if gen.kind == "hessian" or gen.process_group is not None:
        # sharded data: J (rows on each rank) is not a factor of a replicated product, so the
        # function-space routes of Jᵀ·H·J do not apply; products are all-reduced
        n = gen.layer_collection.numel()
        op = MatFree(
            products.matmat,
            (n, n),
            dtype=gen.dtype,
            device=gen.device,
            symmetric=True,
            psd=gen.kind != "hessian",
            batched=True,
            name="∇²L" if gen.kind == "hessian" else "Jᵀ·H·J (all-reduced)",
        )
        op.products = products
        return op
    return GaussNewton(gen, products.examples, products)


# The engine does not build the operators on top of it; this layer lends the generator the method.
CurvatureGenerator.implicit_op = implicit_curvature
