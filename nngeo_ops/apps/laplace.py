"""Laplace approximations of a trained network's posterior, through the operator algebra.

Convention (laplace-torch's, so that results compare): with N examples, the posterior precision is

    P = s·F + P₀,      s = N / (σ²·T),

where F is the curvature *mean* over the examples in the chosen representation (our ``FIM`` of the
softmax for ``likelihood="classification"``, JᵀJ/N for ``"regression"``), so s·F at σ = T = 1 is the
GGN of the *summed* loss; σ is ``sigma_noise`` (regression only), T the ``temperature`` and
P₀ = diag(δ) the prior precision: a scalar, one value per layer, or one per parameter. The prior
is N(θ₀, P₀⁻¹) with θ₀ = ``prior_mean``. The log marginal likelihood is

    log p(D) ≈ log p(D | θ*) − ½·(log det P − log det P₀ + (θ* − θ₀)ᵀ P₀ (θ* − θ₀)),

with log p(D | θ*) = −Σ_n CE_n / T (classification) or
−Σ_n ‖y_n − f_n‖² / (2σ²T) − N·C·log(σ√(2π)) (regression), a differentiable function of δ and σ.

The linear algebra goes through the representation's eigen form (see :mod:`.posterior`): the
eigendecomposition of F is computed once — Kronecker of factor bases for KFAC/EKFAC, one eigh per
block, the exact nonzero spectrum of the low-rank and (for C·N ≤ ``dense_limit``) implicit Fisher —
and every prior precision or noise level is a new shift of the same eigenvalues, so a grid of 100
prior values costs about one fit. The GLM predictive needs J P⁻¹ Jᵀ per test point: Jacobian rows of
a chunk of test points from the :class:`~nngeo_ops.nn.Jacobian` node against P⁻¹ (one product with
Qᵀ), never a dense P×P matrix. Last-layer KFAC/EKFAC uses the Kronecker identity: for a Linear
last layer with input features φ (and a trailing 1 for the bias),
J P⁻¹ Jᵀ = Q_G·diag(w)·Q_Gᵀ with w_i = Σ_j (φᵀq_A,j)² / (s·λ_ij + δ) — (φᵀA⁻¹φ)·G⁻¹/s without
prior — and φᵀ⊗I is never formed.

Dense objects (a dense or block-diagonal F, a chunk of Jacobian rows, samples) are checked against
``LaplaceSettings.memory_limit`` (default: a quarter of the free memory) before they are formed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import (
    ArgumentTypeError,
    DataError,
    InvalidArgumentError,
    ShapeError,
    UnsupportedError,
)
from ..memory import check_memory
from ..nn import (
    FIM,
    LayerCollection,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PVector,
)
from ..nn.engine.distributed import all_reduce_sum, reduce_counts, resolve_group
from ..ops import BlockDiag, CompilePolicy, Diagonal, Identity, LinearOperator
from .glm import LastLayerKron, jacobian_functional, last_layer_kron_applies
from .laplace_data import data_pass
from .posterior import CholeskyPosterior, IterativePosterior, SpectralPosterior

LIKELIHOODS = ("classification", "regression")
LINKS = ("probit", "mc")


class EstimateWarning(UserWarning):
    """A Laplace quantity was estimated (SLQ, CG, stochastic diagonal), not computed exactly."""


@dataclass(frozen=True)
class LaplaceSettings:
    """Settings of :class:`Laplace`.

    Attributes:
        memory_limit: bytes a dense object may take (None: a quarter of the free memory).
        chunk_size: test points per chunk of Jacobian rows in the predictive.
        dense_limit: the implicit Fisher uses its exact function-space spectrum when outputs ×
            examples ≤ dense_limit, SLQ and CG above.
        slq_probes, slq_steps: probes and Lanczos steps of the SLQ log-determinant.
        cg_tol, cg_maxiter: tolerance and iteration cap of the CG solves.
        diag_matvecs: probes of the stochastic diag(P⁻¹) of the iterative route.
        seed: seed of the probes (results are reproducible).
        progress: show progress bars of the passes over the data (None: on a terminal).
    """

    memory_limit: int | None = None
    chunk_size: int = 128
    dense_limit: int = 3000
    slq_probes: int = 30
    slq_steps: int = 40
    cg_tol: float = 1e-8
    cg_maxiter: int | None = None
    diag_matvecs: int = 30
    seed: int = 0
    progress: bool | None = False


def _positive(x, name, like) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if not torch.is_floating_point(t) or not bool(torch.isfinite(t.detach()).all()):
        raise InvalidArgumentError(f"{name} must be finite, got {x!r}")
    if not bool((t.detach() > 0).all()):
        raise InvalidArgumentError(
            f"{name} must be > 0 everywhere, got minimum {float(t.detach().min()):.3g}; a "
            f"non-positive {name} gives an improper Gaussian — pass a positive value"
        )
    return t


def last_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The last module (in ``named_modules()`` order) with trainable parameters of its own."""
    found = None
    for name, mod in model.named_modules():
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            found = (name, mod)
    if found is None:
        raise InvalidArgumentError("the model has no trainable parameters")
    return found


class Laplace:
    """A Laplace approximation N(θ*, P⁻¹) of a trained network (see the module docstring).

    Args:
        model: the trained network (its current parameters are θ*); outputs ``[B, C]``.
        loader: the training data, batches ``(inputs, targets)`` (None: call :meth:`fit` later).
        likelihood: ``"classification"`` (softmax cross-entropy, integer labels) or
            ``"regression"`` (Gaussian of variance σ², float targets shaped like the outputs).
        representation: ``PMatDense``, ``PMatDiag``, ``PMatBlockDiag``, ``PMatKFAC``,
            ``PMatEKFAC``, ``PMatLowRank`` or ``PMatImplicit`` (or a ``functools.partial`` of one).
        prior_precision: δ > 0, a scalar, one value per layer, or one per parameter.
        prior_mean: θ₀, a scalar or one value per parameter.
        subset: ``"all"``, ``"last_layer"`` or a :class:`LayerCollection` of the model.
        sigma_noise: σ of the regression likelihood (must be 1 for classification).
        temperature: T, scales the likelihood term (s = N/(σ²T)).
        settings: a :class:`LaplaceSettings`.

    Shapes: P = number of covered parameters, C outputs, B test points. Vectors over the
    parameters are flat in the layer collection's order.
    """

    def __init__(
        self,
        model: nn.Module,
        loader=None,
        likelihood: str = "classification",
        representation=PMatKFAC,
        prior_precision=1.0,
        prior_mean=0.0,
        subset="all",
        sigma_noise=1.0,
        temperature=1.0,
        settings: LaplaceSettings | None = None,
    ):
        if likelihood not in LIKELIHOODS:
            raise InvalidArgumentError(
                f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}"
            )
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.likelihood = model, likelihood
        self.representation = representation
        self.settings = settings or LaplaceSettings()
        p0 = next(model.parameters(), None)
        if p0 is None:
            raise InvalidArgumentError("the model has no parameters")
        self.dtype, self.device = p0.dtype, p0.device
        self.lc = self._collection(subset)
        self.n_params = self.lc.numel()
        self.subset = subset
        self.sigma_noise = sigma_noise
        self.temperature = _positive(temperature, "temperature", p0.detach())
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self.F = None
        self.last_error: dict[str, torch.Tensor] = {}
        if loader is not None:
            self.fit(loader)

    # ------------------------------------------------------------------ hyperparameters
    def _collection(self, subset) -> LayerCollection:
        if isinstance(subset, LayerCollection):
            return subset
        if subset == "all":
            return LayerCollection.from_model(self.model)
        if subset == "last_layer":
            return LayerCollection.from_modules(self.model, [last_layer(self.model)[1]])
        raise InvalidArgumentError(
            f"subset must be 'all', 'last_layer' or a LayerCollection, got {subset!r}"
        )

    @property
    def prior_precision(self) -> torch.Tensor:
        """δ: a 0-d tensor, one value per layer, or one per parameter."""
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        self._prior = self._check_prior(value)

    def _check_prior(self, value) -> torch.Tensor:
        t = _positive(value, "prior_precision", torch.empty((), dtype=self.dtype))
        n_layers = len(self.lc.layers)
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, n_layers, self.n_params)):
            raise ShapeError(
                f"prior_precision of shape {tuple(t.shape)}: give a scalar, {n_layers} values "
                f"(one per layer) or {self.n_params} (one per parameter)"
            )
        return t.reshape(()) if t.numel() == 1 else t

    def _prior_kind(self, prior: torch.Tensor) -> str:
        if prior.dim() == 0:
            return "scalar"
        if prior.shape[0] == len(self.lc.layers) and prior.shape[0] != self.n_params:
            return "layerwise"
        return "diag"

    def _prior_vec(self, prior: torch.Tensor) -> torch.Tensor:
        """δ as a vector over the parameters (differentiable in ``prior``)."""
        kind = self._prior_kind(prior)
        if kind == "scalar":
            return prior.expand(self.n_params)
        if kind == "layerwise":
            sizes = [e.numel() for e in self.lc.layers.values()]
            return torch.repeat_interleave(prior, torch.tensor(sizes, device=prior.device))
        return prior

    @property
    def sigma_noise(self) -> torch.Tensor:
        """σ of the Gaussian likelihood (regression; 1 for classification): P = N·F/(σ²T) + P₀."""
        return self._sigma

    @sigma_noise.setter
    def sigma_noise(self, value) -> None:
        t = _positive(value, "sigma_noise", torch.empty((), dtype=self.dtype))
        if self.likelihood == "classification" and float(t) != 1.0:
            raise InvalidArgumentError(
                "sigma_noise is a parameter of the regression likelihood; leave it at 1 for "
                "classification (use temperature to scale the likelihood)"
            )
        self._sigma = t.reshape(())

    @property
    def prior_mean(self) -> torch.Tensor:
        """θ₀ of the Gaussian prior N(θ₀, P₀⁻¹), a scalar or a [P] vector."""
        return self._mean

    @prior_mean.setter
    def prior_mean(self, value) -> None:
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        if t.numel() not in (1, self.n_params):
            raise ShapeError(
                f"prior_mean has {t.numel()} entries: give a scalar or {self.n_params} values"
            )
        self._mean = t.reshape(()) if t.numel() == 1 else t.reshape(-1)

    # ------------------------------------------------------------------ fitting
    def fit(self, loader) -> Laplace:
        """Compute the curvature at the model's current parameters θ* (one pass, plus the
        representation's own passes). Returns self.

        Inside an initialised ``torch.distributed`` group each rank passes its own shard: N, the
        loss and the Fisher are those of all the ranks' data (:mod:`nngeo_ops.nn.engine.distributed`)."""
        st = self.settings
        self.N, self._loss, self.n_outputs, self._input_shape = data_pass(
            self.model, loader, self.likelihood, self.dtype, self.device
        )
        group = resolve_group(None)  # as FIM below: the default group when there is one
        if group is not None:  # each rank passed its shard: N and the loss of all the data
            self.N = reduce_counts(group, [self.N], self.device)[0]
            self._loss = all_reduce_sum(group, [self._loss.clone()])[0]
        self.theta = self.lc.flat_parameters(self.model)
        rep = self._rep_class()
        self._check_fit_memory(rep)
        variant = "classif_logits" if self.likelihood == "classification" else "regression"
        self.F = FIM(
            self.model,
            loader,
            self.representation,
            variant=variant,
            layer_collection=self.lc,
            progress=st.progress,
        )
        self._routes: dict[str, object] = {}
        self._kron_ll = None
        self._ll_cache = None
        return self

    def _rep_class(self):
        return getattr(self.representation, "func", self.representation)

    def _check_fit_memory(self, rep) -> None:
        st, p, b = self.settings, self.n_params, self.dtype.itemsize
        sizes = [e.numel() for e in self.lc.layers.values()]
        need = {
            PMatDense: 2 * p * p * b,
            PMatBlockDiag: 2 * sum(k * k for k in sizes) * b,
            PMatLowRank: 2 * p * self.n_outputs * self.N * b,
        }.get(rep, 0)
        what = {
            PMatDense: f"the dense {p}×{p} curvature and its eigenvectors",
            PMatBlockDiag: f"the dense blocks {sizes} of the curvature",
            PMatLowRank: f"the {p}×{self.n_outputs * self.N} low-rank factor",
        }.get(rep, "")
        if need:
            check_memory(
                need,
                what,
                "use representation=PMatKFAC or PMatDiag, or subset='last_layer'",
                st.memory_limit,
                self.device,
            )

    def _require_fit(self) -> None:
        if self.F is None:
            raise InvalidArgumentError("the Laplace approximation is not fitted: call fit(loader)")

    def _check_model(self) -> None:
        if not torch.equal(self.lc.flat_parameters(self.model), self.theta):
            raise DataError(
                "the model's parameters changed since the Laplace fit; the posterior is centred "
                "at the old θ*: restore them or call fit(loader) again"
            )

    # ------------------------------------------------------------------ routes
    def _route(self, kind: str):
        """The posterior backend for a prior of ``kind`` (built once per route)."""
        self._require_fit()
        rep, st = self._rep_class(), self.settings
        if rep is PMatImplicit and self.n_outputs * self.N > st.dense_limit:
            key = "iterative"
            if key not in self._routes:
                self._routes[key] = IterativePosterior(self.F.op, st)
        elif (
            kind != "scalar"
            and rep in (PMatDense, PMatBlockDiag)
            and not (kind == "layerwise" and rep is PMatBlockDiag)
        ):
            key = "cholesky"
            if key not in self._routes:
                op = self.F.op
                if rep is PMatDense:
                    blocks = [(slice(0, self.n_params), op.to_dense())]
                else:
                    sl = list(self.lc.layer_slices().values())
                    blocks = [(s, b.to_dense()) for s, b in zip(sl, op.blocks)]
                self._routes[key] = CholeskyPosterior(blocks)
        else:
            key = "spectral"
            if key not in self._routes:
                self._routes[key] = self._spectral()
        route = self._routes[key]
        if not route.supports(kind):
            raise UnsupportedError(
                f"a {kind} prior precision does not commute with the eigenbasis of "
                f"{rep.__name__} (route {route.route}); use a scalar prior, a per-layer prior "
                "with PMatDiag / PMatBlockDiag / PMatKFAC / PMatEKFAC, or a per-parameter "
                "prior with PMatDiag / PMatDense / PMatBlockDiag"
            )
        return route

    def _spectral(self) -> SpectralPosterior:
        rep, st = self._rep_class(), self.settings
        if rep in (PMatImplicit, PMatLowRank):
            m = self.n_outputs * self.N
            check_memory(
                3 * m * m * self.dtype.itemsize,
                f"the {m}×{m} function-space Gram matrix of the exact spectrum",
                "use representation=PMatKFAC, or fewer examples",
                st.memory_limit,
                self.device,
            )
        if rep is PMatImplicit:  # the function-space spectrum up to this Laplace's dense_limit
            eig = self.F.op.compile(CompilePolicy(dense_limit=st.dense_limit)).eigh()
        else:
            eig = self.F.op.eigh()
        sizes = [e.numel() for e in self.lc.layers.values()]
        blocks = None
        q = eig.Q
        if len(sizes) == 1 and eig.full:
            blocks = list(self.lc.layer_slices().values())
        elif isinstance(q, BlockDiag) and [b.shape[0] for b in q.blocks] == sizes:
            blocks = list(self.lc.layer_slices().values())
        return SpectralPosterior(eig, blocks=blocks, identity_q=rep is PMatDiag)

    def route(self, prior_precision=None) -> str:
        """The name of the route used for ``prior_precision`` (default the current one):
        ``"spectral"``, ``"cholesky"`` or ``"iterative"`` (estimates)."""
        prior = self._prior if prior_precision is None else self._check_prior(prior_precision)
        return self._route(self._prior_kind(prior)).route

    def _scale(self, sigma=None) -> torch.Tensor:
        sigma = self._sigma if sigma is None else sigma
        return self.N / (sigma.square() * self.temperature)

    def _resolve(self, prior_precision, sigma_noise):
        prior = self._prior if prior_precision is None else self._check_prior(prior_precision)
        if sigma_noise is None:
            sigma = self._sigma
        else:
            sigma = _positive(sigma_noise, "sigma_noise", self._sigma).reshape(())
            if self.likelihood == "classification" and float(sigma) != 1.0:
                raise InvalidArgumentError("sigma_noise must be 1 for classification")
        return prior, sigma

    def _note(self, route, name: str) -> None:
        if isinstance(route, IterativePosterior) and name in route.last_error:
            err = route.last_error[name]
            self.last_error[name] = err
            warnings.warn(
                f"{name} of the implicit Fisher is estimated ({'SLQ' if name == 'logdet' else 'CG'}"
                f"), error up to {float(err.max()):.3g}; see Laplace.last_error",
                EstimateWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ marginal likelihood
    def log_likelihood(self, sigma_noise=None) -> torch.Tensor:
        """log p(D | θ*) (see the module docstring), differentiable in ``sigma_noise``."""
        self._require_fit()
        _, sigma = self._resolve(None, sigma_noise)
        factor = 1.0 / (sigma.square() * self.temperature)
        if self.likelihood == "classification":
            return -factor * self._loss
        c = self.N * self.n_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
        return -factor * 0.5 * self._loss - c

    def log_det_posterior_precision(self, prior_precision=None, sigma_noise=None):
        """log det P."""
        prior, sigma = self._resolve(prior_precision, sigma_noise)
        route = self._route(self._prior_kind(prior))
        out = route.logdet(self._scale(sigma), self._prior_vec(prior))
        self._note(route, "logdet")
        return out

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None) -> torch.Tensor:
        """The Laplace evidence (module docstring), a 0-d tensor differentiable in
        ``prior_precision`` and ``sigma_noise`` (pass tensors with ``requires_grad``)."""
        prior, sigma = self._resolve(prior_precision, sigma_noise)
        delta = self._prior_vec(prior)
        diff = self.theta - self._mean
        scatter = (delta * diff.square()).sum()
        logdet_prior = torch.log(delta).sum()
        logdet_post = self.log_det_posterior_precision(prior, sigma)
        return self.log_likelihood(sigma) - 0.5 * (logdet_post - logdet_prior + scatter)

    def optimize_prior_precision(
        self, prior_structure: str | None = None, init=None, max_iter: int = 200
    ) -> torch.Tensor:
        """Maximise the log marginal likelihood over δ (L-BFGS with a strong Wolfe line search on
        log δ), set it and return it.

        ``prior_structure``: ``"scalar"``, ``"layerwise"`` or ``"diag"`` (default: that of the
        current prior). ``init``: the starting point (default the current prior, broadcast).
        """
        self._require_fit()
        kind = prior_structure or self._prior_kind(self._prior)
        size = {"scalar": 1, "layerwise": len(self.lc.layers), "diag": self.n_params}.get(kind)
        if size is None:
            raise InvalidArgumentError(
                f"prior_structure must be 'scalar', 'layerwise' or 'diag', got {kind!r}"
            )
        self._route(kind)  # fails early for an unsupported combination
        start = self._prior if init is None else self._check_prior(init)
        start = start.detach().reshape(-1)
        start = start.expand(size) if start.numel() == 1 else start
        if start.numel() != size:
            raise ShapeError(f"init has {start.numel()} values, a {kind} prior needs {size}")
        log_d = start.log().clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [log_d],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            d = log_d.exp()
            loss = -self.log_marginal_likelihood(d.reshape(()) if kind == "scalar" else d)
            loss.backward()
            return loss

        opt.step(closure)
        best = log_d.detach().exp()
        self.prior_precision = best.reshape(()) if kind == "scalar" else best
        return self.prior_precision

    # ------------------------------------------------------------------ predictive
    def _inputs(self, x) -> torch.Tensor:
        self._require_fit()
        if not torch.is_tensor(x):
            raise ArgumentTypeError(f"x must be a tensor of inputs, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self._input_shape:
            raise ShapeError(
                f"inputs of shape {tuple(x.shape[1:])} per example, but the Laplace "
                f"approximation was fitted on inputs of shape {self._input_shape}"
            )
        self._check_model()
        return x.to(self.device)

    def _kron_fast_path(self, kind: str) -> bool:
        return kind != "diag" and last_layer_kron_applies(self._rep_class(), self.lc, self.model)

    def _glm_chunk_kron(self, x, s, delta):
        if self._kron_ll is None:
            self._kron_ll = LastLayerKron(self.F, self.lc, self.model)
        return self._kron_ll.functional(self.model, x, s, delta)

    def _glm_chunk_jac(self, x, route, s, delta):
        return jacobian_functional(
            self.model, self.lc, x, route, s, delta, self.n_outputs, self.settings
        )

    def _glm(self, x):
        """(f(x; θ*) [B, C], J P⁻¹ Jᵀ [B, C, C])."""
        x = self._inputs(x)
        kind = self._prior_kind(self._prior)
        route = self._route(kind)
        s, delta = self._scale(), self._prior_vec(self._prior)
        fast = self._kron_fast_path(kind) and route.route == "spectral"
        fs, vs, errs = [], [], []
        for start in range(0, x.shape[0], self.settings.chunk_size):
            xc = x[start : start + self.settings.chunk_size]
            if fast:
                f, v = self._glm_chunk_kron(xc, s, delta)
                err = None
            else:
                f, v, err = self._glm_chunk_jac(xc, route, s, delta)
            fs.append(f)
            vs.append(v)
            if err is not None:
                errs.append(err)
        if errs:
            route.last_error["functional_variance"] = torch.cat(errs)
            self._note(route, "functional_variance")
        return torch.cat(fs).detach(), torch.cat(vs).detach()

    def functional_variance(self, x) -> torch.Tensor:
        """J P⁻¹ Jᵀ per test point, [B, C, C] (J the output Jacobian at θ*)."""
        return self._glm(x)[1]

    def predictive(self, x, link: str = "probit", n_samples: int = 100, generator=None):
        """The GLM predictive.

        Classification: probabilities [B, C]; ``link="probit"`` gives
        softmax(f / √(1 + π/8·diag Σ)), ``"mc"`` the mean of softmax(f + L z) over ``n_samples``
        draws z ~ N(0, I) (L the Cholesky factor of Σ = J P⁻¹ Jᵀ; z drawn as
        ``torch.randn(n_samples, B, C, generator=generator)``). Regression: (mean f [B, C],
        variance Σ [B, C, C]) of the latent function (add σ² for the observation noise).
        """
        if self.likelihood == "classification" and link not in LINKS:
            raise InvalidArgumentError(f"link must be one of {LINKS}, got {link!r}")
        f, var = self._glm(x)
        if self.likelihood == "regression":
            return f, var
        if link == "probit":
            kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * var.diagonal(dim1=1, dim2=2))
            return torch.softmax(kappa * f, -1)
        if not isinstance(n_samples, int) or n_samples < 1:
            raise InvalidArgumentError(f"n_samples must be a positive int, got {n_samples!r}")
        L, info = torch.linalg.cholesky_ex(var)
        if bool((info != 0).any()):  # semi-definite Σ: a symmetric square root instead
            e, v = torch.linalg.eigh(var)
            L = v * e.clamp_min(0).sqrt()[:, None, :]
        z = torch.randn(n_samples, *f.shape, generator=generator, dtype=f.dtype, device=f.device)
        fs = f[None] + (L[None] @ z[..., None])[..., 0]
        return torch.softmax(fs, -1).mean(0)

    __call__ = predictive

    # ------------------------------------------------------------------ parameter space
    def posterior_variance(self) -> PVector:
        """diag(P⁻¹) as a :class:`PVector`."""
        kind = self._prior_kind(self._prior)
        route = self._route(kind)
        d = route.diag_inv(self._scale(), self._prior_vec(self._prior))
        self._note(route, "diag_inv")
        return PVector(self.lc, vector_repr=d.detach())

    def sample(self, n_samples: int = 100, generator=None, as_pvectors: bool = False):
        """θ ~ N(θ*, P⁻¹): [n_samples, P] (θ* + P^{-1/2}·z, z drawn as
        ``torch.randn(P, n_samples, generator=generator)``), or a list of PVectors."""
        if not isinstance(n_samples, int) or n_samples < 1:
            raise InvalidArgumentError(f"n_samples must be a positive int, got {n_samples!r}")
        kind = self._prior_kind(self._prior)
        route = self._route(kind)
        check_memory(
            3 * n_samples * self.n_params * self.dtype.itemsize,
            f"{n_samples} samples of {self.n_params} parameters",
            "draw fewer samples per call",
            self.settings.memory_limit,
            self.device,
        )
        z = torch.randn(
            self.n_params, n_samples, generator=generator, dtype=self.dtype, device=self.device
        )
        out = self.theta[:, None] + route.inv_sqrt(z, self._scale(), self._prior_vec(self._prior))
        out = out.mT.detach()
        if as_pvectors:
            return [PVector(self.lc, vector_repr=row.clone()) for row in out]
        return out

    @property
    def posterior_precision(self) -> LinearOperator:
        """P = s·F + P₀ as an ops expression over the representation's node ``F.op``.

        Spelled so that compiling it takes exact routes: a scalar prior as s·(F + (δ/s)·I) (the
        shift is absorbed into KFAC/EKFAC eigenvalues, block Cholesky, Woodbury...), a per-layer
        prior as one shifted block per layer.
        """
        self._require_fit()
        op, s = self.F.op, float(self._scale())
        kind = self._prior_kind(self._prior)
        n = self.n_params
        if kind == "scalar":
            return s * (op + (float(self._prior) / s) * Identity(n, dtype=op.dtype))
        sizes = [e.numel() for e in self.lc.layers.values()]
        if (
            kind == "layerwise"
            and isinstance(op, BlockDiag)
            and [b.shape[0] for b in op.blocks] == sizes
        ):
            return BlockDiag(
                [
                    s * (b + (float(d) / s) * Identity(b.shape[0], dtype=op.dtype))
                    for b, d in zip(op.blocks, self._prior)
                ]
            )
        return s * op + Diagonal(self._prior_vec(self._prior).detach())

    def explain(self) -> str:
        """The convention, the route and the posterior precision as a formula."""
        self._require_fit()
        kind = self._prior_kind(self._prior)
        route = self._route(kind)
        lines = [
            f"Laplace({self.likelihood}, {self._rep_class().__name__}, {self.n_params} parameters"
            f", N={self.N}, C={self.n_outputs})",
            f"P = s·F + P₀, s = N/(σ²T) = {float(self._scale()):.6g}, {kind} prior",
            f"route: {route.route}",
            f"posterior precision: {route.node(self._scale(), self._prior_vec(self._prior))}",
        ]
        if route.route == "spectral" and self._kron_fast_path(kind):
            lines.append("functional variance: last-layer Kronecker identity (φᵀ⊗I not formed)")
        return "\n".join(lines)
