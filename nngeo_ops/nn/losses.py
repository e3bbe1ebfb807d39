"""Output models: the curvature of the loss (or of the log-likelihood) in output space.

For an example n with output f_n (shape ``(C, *S)``), each output model gives a factor L_n with
``K`` columns such that the output-space matrix is H_n = L_n L_nᵀ. The parameter-space curvature is then

    M = (1/N) Σ_n J_nᵀ H_n J_n = (1/N) Σ_n Σ_k (J_nᵀ L_n[:, k]) (J_nᵀ L_n[:, k])ᵀ,

where N is the sum of the ``count`` that the factor returns for each batch (``None`` for a sum
reduction: N = 1). Factors are returned *column-major over the batch*: a tensor of shape
``(K, B, *out_shape)``, ready to be back-propagated as K batched cotangents.

Three ways to get L_n:

* ``exact``: a square root of the true output Hessian / Fisher (softmax: L[:, c] = √p_c (e_c − p),
  whose Gram is diag(p) − ppᵀ);
* ``sample``: Monte-Carlo, columns ∇_f log p(ŷ_t | f) / √T for T labels ŷ_t drawn from the model
  (``torch.Generator`` honoured);
* ``empirical``: one column, the gradient of −log p(y | f) at the true label.

FIM variants (NNGeometry names): ``classif_logits``, ``classif_logsoftmax``, ``classif_binary_logits``,
``regression`` (Gaussian with covariance Σ: H = Σ⁻¹), ``segmentation_logits`` (per-pixel softmax,
summed over pixels), ``sequence_logits`` (per-token softmax over the last dim of (B, T, V) logits,
summed over tokens); all are means over examples. GGN losses: ``CrossEntropyLoss``, ``NLLLoss``,
``MSELoss``, ``BCEWithLogitsLoss``; ``mean`` divides by what torch divides by (non-ignored targets for
CE/NLL, elements for MSE/BCE), ``sum`` does not divide.

NLLLoss is linear in its input, so the GGN split after the model output would be zero. As everywhere
else (and since log_softmax(f) = f for normalised log-probabilities) the log-softmax is treated as part
of the loss: H = diag(p) − ppᵀ, which equals diag(p) on the range of J because pᵀJ = 0 for normalised
outputs. We use the diag(p) factor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn

from ..errors import (  # noqa: F401  (DataError re-exported)
    ArgumentTypeError,
    DataError,
    DTypeDeviceError,
    NNGeoError,
    NonFiniteError,
    NotPSDError,
    NotSymmetricError,
    ShapeError,
    UnsupportedError,
)


# ---------------------------------------------------------------------- factor helpers
def softmax_factor(logits: torch.Tensor) -> torch.Tensor:
    """Exact factor of diag(p) − ppᵀ per position, for logits of shape (B, C, *S), with C − 1
    columns per position (the rank of diag(p) − ppᵀ, whose null space holds the ones vector).

    Returns ((C−1)·D, B, C, *S) with D = prod(S), column (j, d) placed at position d, so that
    distinct positions never mix (for C = 1, one zero column per position). The columns are the
    stick-breaking form of the categorical distribution (a chain of conditional Bernoulli draws):
    with the tail sums q_j = Σ_{i≥j} p_i (q_0 = 1), column j = 0 … C−2 is

        v_j = √(p_j / (q_j q_{j+1})) · (q_{j+1} e_j − Σ_{i>j} p_i e_i),

    and Σ_j v_j v_jᵀ = diag(p) − ppᵀ exactly: p_j / (q_j q_{j+1}) = 1/q_{j+1} − 1/q_j telescopes,
    so entry (i, l), i ≤ l, is p_i p_l (1/q_i − 1) + [i = l] p_i q_{i+1}/q_i − [i < l] p_i p_l/q_i
    = [i = l] p_i − p_i p_l. Every K-column pass (exact Fisher/GGN) back-propagates C − 1 columns
    instead of the C of the symmetric square root √p_c (e_c − p). The tail sums are cumulative sums
    from the end (no 1 − Σ cancellation); a tail that underflows to 0 has p_i = 0 in every entry it
    scales, and the clamp of the denominators to the smallest normal number makes those entries 0.
    """
    b, c = logits.shape[:2]
    sp = logits.shape[2:]
    p = torch.softmax(logits.detach().reshape(b, c, -1), dim=1)  # (B, C, D)
    d = p.shape[2]
    if c == 1:  # diag(p) − ppᵀ = 0
        k, base = 1, p.new_zeros(1, b, 1, d)
    else:
        k = c - 1
        tiny = torch.finfo(p.dtype).tiny
        q = p.flip(1).cumsum(1).flip(1)  # q_j = Σ_{i≥j} p_i
        # p_j / q_j ≤ 1 (q_j ≥ p_j also in floating point) and p_i ≤ q_{j+1}: no product of two
        # small numbers is formed, so nothing underflows before the square roots
        ratio = p[:, :-1] / q[:, :-1].clamp_min(tiny)
        lead = (ratio * q[:, 1:]).sqrt()  # (B, C−1, D): entry j of column j
        tail = ratio.sqrt() / q[:, 1:].clamp_min(tiny).sqrt()  # times −p_i: entries i > j
        idx = torch.arange(c, device=p.device)
        below = (idx[None, :] > idx[:k, None]).to(p.dtype)  # (C−1, C): i > j
        on = (idx[None, :] == idx[:k, None]).to(p.dtype)
        base = on[:, None, :, None] * lead.permute(1, 0, 2)[:, :, None, :] - below[
            :, None, :, None
        ] * (tail.permute(1, 0, 2)[:, :, None, :] * p[None])  # (C−1, B, C, D)
    if d == 1:
        return base.reshape(k, b, c, *sp)
    out = p.new_zeros(k, d, b, c, d)
    out.diagonal(dim1=1, dim2=4).copy_(base)
    return out.reshape(k * d, b, c, *sp)


def diag_factor(h: torch.Tensor) -> torch.Tensor:
    """Exact factor of diag(h) per example, h of shape (B, *S): returns (E, B, *S), E = prod(S)."""
    b = h.shape[0]
    flat = h.detach().reshape(b, -1).clamp_min(0).sqrt()
    return torch.diag_embed(flat).permute(1, 0, 2).reshape(flat.shape[1], *h.shape)


def apply_factor(lmat: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(L Lᵀ) applied per example: ``lmat`` (K, B, *out), ``u`` (k, B, *out) -> (k, B, *out)."""
    dims = list(range(2, lmat.dim()))  # einsum labels: 0 = K, 1 = batch, dims = outputs
    j = len(dims) + 2  # the column of U
    coef = torch.einsum(lmat, [0, 1, *dims], u, [j, 1, *dims], [0, j, 1])  # L_kᵀ u_j per example
    return torch.einsum(coef, [0, j, 1], lmat, [0, 1, *dims], [j, 1, *dims])


def softmax_hessian(logits: torch.Tensor, dim: int = 1):
    """``u ↦ (diag(p) − ppᵀ) u`` at every position, p the softmax of ``logits`` (B, …) over ``dim``
    (computed here, once), for ``u`` of shape (k, B, …): ``p ⊙ u − p · Σ_dim (p ⊙ u)``. The product
    of :func:`softmax_factor` L with Lᵀ u, without forming L (three elementwise passes instead of
    the factor's dozen)."""
    p = class_softmax(logits.detach(), dim)

    def h(u):
        pu = p * u
        return pu - p * pu.sum(dim + 1, keepdim=True)

    return h


def _scaling(w: torch.Tensor):
    """``u ↦ w ⊙ u``: a diagonal output Hessian of entries ``w`` (B, …)."""
    return lambda u: w * u


def class_softmax(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``torch.softmax(logits, dim)``, contiguous. Over the last dim of fewer than 16 classes of
    a contiguous 2-D CPU tensor it runs as a softmax over dim 0 of the transpose (the same
    numbers to rounding), then one copy back: torch's CPU kernel takes ~46 µs for (256, 10)
    float32 logits along their last dim, ~12 µs this way (a product with a non-contiguous ``p``
    would cost 5× more later)."""
    if (
        logits.dim() == 2
        and dim in (1, -1)
        and logits.shape[1] < 16
        and logits.device.type == "cpu"
        and logits.is_contiguous()
    ):
        return torch.softmax(logits.T, 0).T.contiguous()
    return torch.softmax(logits, dim)


def _per_draw(cols: torch.Tensor, trials: int) -> torch.Tensor:
    """The Monte-Carlo columns scaled by 1/√trials (their outer products average over the draws);
    one draw is returned as it is, without a pass that divides by 1."""
    return cols if trials == 1 else cols / math.sqrt(trials)


def _onehot(y, c, dtype):
    # one-hot along dim 1, for labels of shape (..., *S) -> (..., C, *S)
    return Fn.one_hot(y, c).movedim(-1, 1).to(dtype)


def _sample_classes(p: torch.Tensor, trials: int, rng) -> torch.Tensor:
    """p (B, C, D) -> labels (T, B, D), or p (B, C) -> labels (T, B), by inverting the cumulative
    distribution (several times faster than ``torch.multinomial`` for few draws; zero-probability
    classes are never drawn). The draws of a (B, C) ``p`` are those of its (B, C, 1) form, without
    the four views that go from one to the other (~1 µs each)."""
    if p.dim() == 2:
        cdf = p.cumsum(1)
        u = torch.rand((p.shape[0], trials), generator=rng, dtype=p.dtype, device=p.device)
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(p.shape[1] - 1).T
    b, c, d = p.shape
    cdf = p.permute(0, 2, 1).reshape(-1, c).cumsum(1)
    u = torch.rand((cdf.shape[0], trials), generator=rng, dtype=p.dtype, device=p.device)
    y = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(c - 1)
    return y.T.reshape(trials, b, d)


def check_class_labels(y, b: int, c: int, spatial, ignore_index=None) -> torch.Tensor:
    if y is None:
        raise DataError("this computation needs labels: the loader must yield (inputs, labels)")
    if not torch.is_tensor(y) or y.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
    ):
        raise DTypeDeviceError(
            f"class labels must be an integer tensor, got {getattr(y, 'dtype', type(y))}"
        )
    if tuple(y.shape) != (b, *spatial):
        raise ShapeError(
            f"labels of shape {tuple(y.shape)} for outputs with batch {b} and spatial shape "
            f"{tuple(spatial)}: expected {(b, *spatial)}"
        )
    y = y.long()
    valid = y != ignore_index if ignore_index is not None else torch.ones_like(y, dtype=torch.bool)
    bad = valid & ((y < 0) | (y >= c))
    if bad.any():
        raise DataError(f"labels must lie in [0, {c}); found {y[bad][:5].tolist()}")
    return y


def check_log_probs(out, what):
    lse = torch.logsumexp(out.detach(), dim=1)
    if not torch.allclose(lse, torch.zeros_like(lse), atol=1e-4):
        raise DataError(
            f"{what} expects normalised log-probabilities over dim 1 (logsumexp = 0); "
            "apply log_softmax, or use raw logits with classif_logits / CrossEntropyLoss"
        )


def _check_same_shape(y, out, what):
    if y is None:
        raise DataError(f"{what} needs labels: the loader must yield (inputs, targets)")
    if tuple(y.shape) != tuple(out.shape):
        raise ShapeError(
            f"{what}: targets of shape {tuple(y.shape)} for outputs {tuple(out.shape)}"
        )


# ---------------------------------------------------------------------- base class
class OutputModel:
    """Interface of an output model; subclasses implement the factors.

    ``reduction`` is ``"mean"`` or ``"sum"``; each factor method returns ``(L, count)``.
    """

    name = "output"
    reduction = "mean"
    needs_labels_exact = False

    def check_output(self, out: torch.Tensor, n_output=None) -> None:
        if out.dim() < 2:
            raise ShapeError(
                f"{self.name}: model outputs must be (batch, n_output, ...), got {tuple(out.shape)}"
            )
        if n_output is not None and out.shape[1] != n_output:
            raise ShapeError(
                f"n_output={n_output} but the model returns {out.shape[1]} outputs "
                f"(output shape {tuple(out.shape)})"
            )

    def exact(self, out, y):
        raise NotImplementedError

    def exact_hessian(self, out, y):
        """``(h, count)`` for the factor ``(L, count)`` of :meth:`exact`: ``h(u) = L Lᵀ u`` for ``u``
        of shape (k, *out.shape), the output Hessian of each example applied to its rows of ``u``
        (what the implicit GGN products need), with what it reads of ``out`` and ``y`` (a softmax,
        a mask of ignored labels) computed here, once. Output models with a closed form override
        it; the default forms L."""
        lmat, count = self.exact(out, y)
        return (lambda u: apply_factor(lmat, u.to(lmat.dtype))), count

    def exact_apply(self, out, y, u: torch.Tensor):
        """``(L Lᵀ u, count)``: :meth:`exact_hessian` applied to ``u``."""
        h, count = self.exact_hessian(out, y)
        return h(u), count

    def scale(self, total: int, n_examples: int) -> float:
        """The normalisation of a whole pass: 1/total for ``mean`` (total = the summed counts of
        the batches), 1 for ``sum``; DataError for an empty pass or a mean over no counted target."""
        if n_examples == 0:
            raise DataError("the loader yielded no examples")
        if self.reduction != "mean":
            return 1.0
        if total == 0:
            ign = getattr(getattr(self, "loss_fn", None), "ignore_index", None)
            raise DataError(
                f"every target was ignored (ignore_index={ign}): the mean over counted targets is "
                "undefined; give batches with at least one label that is not ignore_index, or use "
                "the loss with reduction='sum'"
            )
        return 1.0 / total

    def sample(self, out, y, trials: int, rng=None):
        raise UnsupportedError(f"Monte-Carlo sampling is not defined for {self.name}")

    def empirical(self, out, y):
        raise UnsupportedError(f"the empirical Fisher is not defined for {self.name}")

    def loss(self, out, y):
        """The batch's contribution to the summed objective (for the exact Hessian), and its count."""
        raise UnsupportedError(f"no scalar loss for {self.name}; use GGN/Hessian with a loss_fn")


class ClassifLogits(OutputModel):
    """Softmax over dim 1 of logits (B, C); Fisher = Jᵀ(diag p − ppᵀ)J, mean over examples."""

    name = "classif_logits"

    def check_output(self, out, n_output=None):
        super().check_output(out, n_output)
        if out.dim() != 2:
            raise ShapeError(
                f"classif_logits expects outputs (batch, classes), got {tuple(out.shape)}; "
                "use variant='segmentation_logits' for per-pixel outputs"
            )

    def exact(self, out, y):
        return softmax_factor(out), out.shape[0]

    def exact_hessian(self, out, y):
        return softmax_hessian(out), out.shape[0]

    def sample(self, out, y, trials, rng=None):
        p = class_softmax(out.detach())
        lab = _sample_classes(p, trials, rng)  # (T, B), in [0, C)
        # one_hot(lab) − p, the one-hot written in p's dtype: one_hot itself checks the labels'
        # range (an aminmax and two synchronisations) and returns int64 to cast
        cols = p.new_zeros((trials, *p.shape)).scatter_(2, lab.unsqueeze(2), 1.0).sub_(p)
        return _per_draw(cols, trials), out.shape[0]

    def empirical(self, out, y):
        y = check_class_labels(y, out.shape[0], out.shape[1], ())
        p = class_softmax(out.detach())
        return (p - _onehot(y, out.shape[1], p.dtype))[None], out.shape[0]


class ClassifLogSoftmax(ClassifLogits):
    """Outputs are log-probabilities f = log p; Fisher = Jᵀ diag(p) J, mean over examples."""

    name = "classif_logsoftmax"

    def check_output(self, out, n_output=None):
        super().check_output(out, n_output)
        check_log_probs(out, self.name)

    def exact(self, out, y):
        return diag_factor(out.detach().exp()), out.shape[0]

    def exact_hessian(self, out, y):
        return _scaling(out.detach().exp()), out.shape[0]

    def sample(self, out, y, trials, rng=None):
        p = out.detach().exp()
        lab = _sample_classes(p, trials, rng)
        cols = Fn.one_hot(lab, out.shape[1]).to(p.dtype)
        return _per_draw(cols, trials), out.shape[0]

    def empirical(self, out, y):
        y = check_class_labels(y, out.shape[0], out.shape[1], ())
        return -_onehot(y, out.shape[1], out.dtype)[None], out.shape[0]


class ClassifBinaryLogits(OutputModel):
    """Independent sigmoids on each output (B, C), C = 1 usually; Fisher = Jᵀ diag(σ(1−σ)) J."""

    name = "classif_binary_logits"

    def exact(self, out, y):
        p = torch.sigmoid(out.detach())
        return diag_factor(p * (1 - p)), out.shape[0]

    def exact_hessian(self, out, y):
        p = torch.sigmoid(out.detach())
        return _scaling(p * (1 - p)), out.shape[0]

    def sample(self, out, y, trials, rng=None):
        p = torch.sigmoid(out.detach())
        u = torch.rand((trials, *p.shape), generator=rng, dtype=p.dtype, device=p.device)
        return _per_draw((u < p).to(p.dtype) - p, trials), out.shape[0]

    def empirical(self, out, y):
        if y is not None and y.shape != out.shape and y.numel() == out.numel():
            y = y.reshape(out.shape)
        _check_same_shape(y, out, self.name)
        if ((y != 0) & (y != 1)).any():
            raise DataError("classif_binary_logits expects labels in {0, 1}")
        return (torch.sigmoid(out.detach()) - y.to(out.dtype))[None], out.shape[0]


def check_covariance(cov) -> torch.Tensor:
    """The regression covariance as a tensor, checked: a positive scalar σ², a positive vector (a
    diagonal Σ) or a symmetric positive-definite matrix; finite. Raises with the fix otherwise."""
    if isinstance(cov, bool) or not (
        torch.is_tensor(cov) or isinstance(cov, int | float) or hasattr(cov, "__array__")
    ):
        raise ArgumentTypeError(
            f"covariance must be a number, a vector or a matrix (tensor), got {type(cov).__name__}"
        )
    t = torch.as_tensor(cov)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.dim() > 2 or (t.dim() == 2 and t.shape[0] != t.shape[1]):
        raise ShapeError(
            f"covariance of shape {tuple(t.shape)}: give σ² (a number), a vector (diagonal) or a "
            "square (E, E) matrix"
        )
    if not torch.isfinite(t).all():
        raise NonFiniteError("covariance contains NaN or inf: give a finite covariance")
    if t.dim() < 2:
        if (t <= 0).any():
            raise NotPSDError(
                "covariance must be positive (σ² > 0, or every diagonal entry > 0); it is a "
                "variance of the Gaussian likelihood, not a precision or a log-variance"
            )
        return t
    d = t.to(torch.float64)
    if not torch.allclose(d, d.T, rtol=1e-6, atol=1e-12 * float(d.abs().max())):
        raise NotSymmetricError("covariance is not symmetric: pass (S + S.T) / 2")
    if torch.linalg.cholesky_ex(d).info != 0:
        raise NotPSDError(
            "covariance is not positive definite: give an SPD matrix (e.g. S + eps * I), or a "
            "vector for a diagonal covariance"
        )
    return t


class Regression(OutputModel):
    """Gaussian likelihood N(f, Σ) on the flattened outputs; Fisher = Jᵀ Σ⁻¹ J, mean over examples.

    ``covariance``: None (identity), a positive scalar σ², a vector (diagonal) or a full SPD matrix.
    """

    name = "regression"

    def __init__(self, covariance=None):
        self.covariance = None if covariance is None else check_covariance(covariance)
        self._root = None

    def precision_root(self, e: int, dtype, device) -> torch.Tensor:
        """R with R Rᵀ = Σ⁻¹, shape (E, E)."""
        cov = self.covariance
        if cov is None:
            return torch.eye(e, dtype=dtype, device=device)
        cov = torch.as_tensor(cov, dtype=dtype, device=device)
        if cov.dim() == 0:
            return torch.eye(e, dtype=dtype, device=device) / cov.sqrt()
        if cov.dim() == 1:
            if cov.shape[0] != e:
                raise ShapeError(f"covariance of length {cov.shape[0]} for {e} outputs")
            return torch.diag(cov.rsqrt())
        if cov.shape != (e, e):
            raise ShapeError(f"covariance of shape {tuple(cov.shape)} for {e} outputs")
        return torch.linalg.cholesky(torch.linalg.inv(cov))

    def exact(self, out, y):
        b, e = out.shape[0], out[0].numel()
        r = self.precision_root(e, out.dtype, out.device)
        return r.T[:, None, :].expand(e, b, e).reshape(e, *out.shape), b

    def exact_hessian(self, out, y):
        if self.covariance is None:  # Σ⁻¹ = I
            return (lambda u: u.clone()), out.shape[0]
        b, e = out.shape[0], out[0].numel()
        r = self.precision_root(e, out.dtype, out.device)
        prec = r @ r.T
        return (lambda u: (u.reshape(-1, b, e) @ prec).reshape(u.shape)), b

    def sample(self, out, y, trials, rng=None):
        b, e = out.shape[0], out[0].numel()
        r = self.precision_root(e, out.dtype, out.device)
        eps = torch.randn((trials, b, e), generator=rng, dtype=out.dtype, device=out.device)
        return _per_draw((eps @ r.T).reshape(trials, *out.shape), trials), b

    def empirical(self, out, y):
        _check_same_shape(y, out, self.name)
        b, e = out.shape[0], out[0].numel()
        r = self.precision_root(e, out.dtype, out.device)
        res = (out.detach() - y.to(out.dtype)).reshape(b, e)
        return (res @ r @ r.T).reshape(1, *out.shape), b


class SegmentationLogits(OutputModel):
    """Per-pixel softmax over dim 1 of (B, C, *S); Fisher summed over pixels, mean over examples."""

    name = "segmentation_logits"

    def check_output(self, out, n_output=None):
        super().check_output(out, n_output)
        if out.dim() < 3:
            raise ShapeError(f"segmentation_logits expects (batch, C, *spatial), got {out.shape}")

    def exact(self, out, y):
        return softmax_factor(out), out.shape[0]

    def exact_hessian(self, out, y):
        return softmax_hessian(out), out.shape[0]

    def sample(self, out, y, trials, rng=None):
        b, c = out.shape[:2]
        p = torch.softmax(out.detach().reshape(b, c, -1), dim=1)
        lab = _sample_classes(p, trials, rng)  # (T, B, D)
        cols = _onehot(lab.reshape(-1, lab.shape[-1]), c, p.dtype).reshape(trials, b, c, -1) - p
        return _per_draw(cols.reshape(trials, *out.shape), trials), b

    def empirical(self, out, y):
        b, c = out.shape[:2]
        y = check_class_labels(y, b, c, out.shape[2:])
        p = class_softmax(out.detach())
        return (p - _onehot(y, c, p.dtype))[None], b


class SequenceLogits(SegmentationLogits):
    """Per-token softmax over the last dim of (B, T, V) logits (language models, sequence taggers).

    The Fisher is summed over tokens and averaged over sequences, as for ``segmentation_logits``;
    labels are token ids of shape (B, T). ``n_output`` is checked against the vocabulary size V.
    """

    name = "sequence_logits"

    def check_output(self, out, n_output=None):
        if out.dim() != 3:
            raise ShapeError(
                f"sequence_logits expects (batch, seq, vocab) logits, got {tuple(out.shape)}"
            )
        if n_output is not None and out.shape[-1] != n_output:
            raise ShapeError(
                f"n_output={n_output} but the model returns {out.shape[-1]} logits per token "
                f"(output shape {tuple(out.shape)})"
            )

    # the factors are those of segmentation_logits with the class axis moved to dim 1 and back:
    # L has shape (R, B, T, V) like the outputs it pairs with
    def exact(self, out, y):
        L, n = super().exact(out.movedim(-1, 1), y)
        return L.movedim(2, -1), n

    def exact_hessian(self, out, y):
        return softmax_hessian(out, dim=out.dim() - 1), out.shape[0]

    def sample(self, out, y, trials, rng=None):
        L, n = super().sample(out.movedim(-1, 1), y, trials, rng)
        return L.movedim(2, -1), n

    def empirical(self, out, y):
        L, n = super().empirical(out.movedim(-1, 1), y)
        return L.movedim(2, -1), n


VARIANTS = {
    "classif_logits": ClassifLogits,
    "classif_logsoftmax": ClassifLogSoftmax,
    "classif_binary_logits": ClassifBinaryLogits,
    "regression": Regression,
    "segmentation_logits": SegmentationLogits,
    "sequence_logits": SequenceLogits,
}


def output_model_for_variant(variant: str, covariance=None) -> OutputModel:
    if isinstance(variant, OutputModel):
        return variant
    if variant not in VARIANTS:
        raise UnsupportedError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if variant == "regression":
        return Regression(covariance)
    if covariance is not None:
        raise NNGeoError(f"covariance is only meaningful for variant='regression', not {variant!r}")
    return VARIANTS[variant]()


# ---------------------------------------------------------------------- GGN losses
class LossOutputModel(OutputModel):
    """GGN of a torch loss module; ``loss`` also serves the exact Hessian."""

    def __init__(self, loss_fn: nn.Module):
        self.loss_fn = loss_fn
        self.reduction = loss_fn.reduction
        self.name = type(loss_fn).__name__
        if self.reduction not in ("mean", "sum"):
            raise UnsupportedError(f"{self.name}(reduction={self.reduction!r}): use mean or sum")
        for attr in ("weight", "pos_weight"):
            if getattr(loss_fn, attr, None) is not None:
                raise UnsupportedError(f"{self.name} with a {attr} is not supported")

    def count(self, out, y) -> int:
        """What the ``mean`` reduction divides the batch's summed loss by."""
        return out.numel()

    def loss(self, out, y):
        count = self.count(out, y)
        value = self.loss_fn(out, y)
        return (value * count if self.reduction == "mean" else value), count


class CrossEntropyGGN(LossOutputModel):
    needs_labels_exact = True

    def _mask(self, out, y):
        b, c = out.shape[:2]
        if torch.is_tensor(y) and y.is_floating_point():  # class probabilities
            _check_same_shape(y, out, self.name)
            return None, b * out[0, 0].numel()
        ign = self.loss_fn.ignore_index
        y = check_class_labels(y, b, c, out.shape[2:], ignore_index=ign)
        mask = y != ign
        return mask, int(mask.sum())

    def count(self, out, y):
        return self._mask(out, y)[1]

    def exact(self, out, y):
        mask, count = self._mask(out, y)
        lf = self._factor(out)
        if mask is not None:
            lf = lf * mask[None, :, None].to(lf.dtype)
        return lf, count

    def _factor(self, out):
        return softmax_factor(out)

    def exact_hessian(self, out, y):
        mask, count = self._mask(out, y)
        h = self._hessian(out)
        if mask is None:
            return h, count
        m = mask.unsqueeze(1)  # (B, *S) over the rows (k, B, C, *S)

        def masked(u):
            hu = h(u)
            return hu * m.to(hu.dtype)

        return masked, count

    def _hessian(self, out):
        return softmax_hessian(out)


class NLLGGN(CrossEntropyGGN):
    def check_output(self, out, n_output=None):
        super().check_output(out, n_output)
        check_log_probs(out, self.name)

    def _factor(self, out):
        b, c = out.shape[:2]
        p = out.detach().exp()
        if out.dim() == 2:
            return diag_factor(p)
        # one column per (class, position), each supported at its own position only
        flat = p.reshape(b, c, -1)
        d = flat.shape[2]
        lf = diag_factor(flat.reshape(b, c * d))  # (C·D, B, C·D)
        return lf.reshape(c * d, b, c, *out.shape[2:])

    def _hessian(self, out):
        return _scaling(out.detach().exp())


class MSEGGN(LossOutputModel):
    def exact(self, out, y):
        return diag_factor(torch.full_like(out, 2.0)), out.numel()

    def exact_hessian(self, out, y):
        return (lambda u: 2.0 * u), out.numel()

    def loss(self, out, y):
        _check_same_shape(y, out, self.name)
        return super().loss(out, y)


class BCEWithLogitsGGN(LossOutputModel):
    def exact(self, out, y):
        p = torch.sigmoid(out.detach())
        return diag_factor(p * (1 - p)), out.numel()

    def exact_hessian(self, out, y):
        p = torch.sigmoid(out.detach())
        return _scaling(p * (1 - p)), out.numel()

    def loss(self, out, y):
        _check_same_shape(y, out, self.name)
        return super().loss(out, y)


LOSSES = {
    nn.CrossEntropyLoss: CrossEntropyGGN,
    nn.NLLLoss: NLLGGN,
    nn.MSELoss: MSEGGN,
    nn.BCEWithLogitsLoss: BCEWithLogitsGGN,
}


def output_model_for_loss(loss_fn) -> OutputModel:
    if isinstance(loss_fn, OutputModel):
        return loss_fn
    cls = LOSSES.get(type(loss_fn))
    if cls is None:
        raise UnsupportedError(
            f"no GGN rule for loss {type(loss_fn).__name__}; supported: "
            + ", ".join(k.__name__ for k in LOSSES)
        )
    return cls(loss_fn)
