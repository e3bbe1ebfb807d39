"""Independent dense ground truth with torch.func, for small float64 models.

Everything here works on the flat vector of the trainable parameters in ``named_parameters()`` order,
and is written without any code of ``nngeo_ops.nn``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian, jacrev


def flat_fn(model, names=None):
    """(f(flat, *inputs) -> outputs, flat0) with the chosen parameters replaced by ``flat``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params) if names is None else list(names)
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    # every (module, attribute) pair holding each chosen tensor, once: a module registered under
    # two names is one pair, a weight shared by two modules two pairs (functional_call's own weight
    # tying would swap a doubly-registered module twice and leave the model damaged)
    chosen = {id(params[n]): n for n in names}
    paths, seen = {n: [] for n in names}, set()
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None and id(p) in chosen and (id(mod), attr) not in seen:
                seen.add((id(mod), attr))
                paths[chosen[id(p)]].append(f"{mod_name}.{attr}" if mod_name else attr)

    def f(flat, *inputs):
        d, i = {}, 0
        for n, s, k in zip(names, shapes, numels):
            for path in paths[n]:
                d[path] = flat[i : i + k].reshape(s)
            i += k
        return functional_call(model, d, inputs, tie_weights=False)

    return f, flat0


def jacobian(model, x, names=None):
    """J of shape (B, *out_shape, P)."""
    f, flat0 = flat_fn(model, names)
    return jacrev(lambda w: f(w, x))(flat0)


def ggn_from_output_hessian(model, x, hout, names=None):
    """Jᵀ H J for an output-space matrix ``hout`` of shape (B·O, B·O) (the whole batch)."""
    j = jacobian(model, x, names)
    j = j.reshape(-1, j.shape[-1])
    return j.T @ hout @ j


def loss_output_hessian(out, y, loss_fn):
    """Hessian of loss_fn(out, y) with respect to the outputs, flattened (B·O, B·O)."""
    h = hessian(lambda o: loss_fn(o, y))(out.detach())
    n = out.numel()
    return h.reshape(n, n)


def ggn(model, x, y, loss_fn, names=None):
    """The GGN of loss_fn(model(x), y) on one batch (all data at once)."""
    out = model(x)
    return ggn_from_output_hessian(model, x, loss_output_hessian(out, y, loss_fn), names)


def _per_example_blocks(out, fisher_of_one):
    b = out.shape[0]
    blocks = [fisher_of_one(out[i].detach()) for i in range(b)]
    return torch.block_diag(*blocks)


def fisher_output_matrix(out, variant, covariance=None):
    """Block-diagonal (over examples) output Fisher E_y[∇ log p ∇ log pᵀ], by enumeration over y."""

    def classif(o):  # o: (C,) logits
        jl = jacrev(lambda v: torch.log_softmax(v, 0))(o)  # (C, C): row y = ∇ log p(y)
        p = torch.softmax(o, 0)
        return jl.T @ torch.diag(p) @ jl

    def logsoftmax(o):  # o = log p: p(y) = exp(o_y), ∇_o log p(y) = e_y
        return torch.diag(o.exp())

    def binary(o):  # independent Bernoulli on each output; y in {0,1}
        p = torch.sigmoid(o)
        h = torch.zeros(o.numel(), o.numel(), dtype=o.dtype)
        for i in range(o.numel()):
            for yv in (0.0, 1.0):
                prob = p[i] if yv == 1 else 1 - p[i]
                gi = yv - p[i]  # d/do log Bernoulli(y | sigmoid(o))
                h[i, i] += prob * gi * gi
        return h

    def regression(o):
        e = o.numel()
        cov = torch.eye(e, dtype=o.dtype) if covariance is None else covariance
        cov = torch.as_tensor(cov, dtype=o.dtype)
        if cov.dim() == 0:
            cov = cov * torch.eye(e, dtype=o.dtype)
        elif cov.dim() == 1:
            cov = torch.diag(cov)
        return torch.linalg.inv(cov)

    def segmentation(o):  # o: (C, *S); independent softmax per pixel, log-lik summed
        c = o.shape[0]
        flat = o.reshape(c, -1)
        d = flat.shape[1]
        jl = jacrev(lambda v: torch.log_softmax(v.reshape(c, d), 0))(flat.reshape(-1))
        jl = jl.reshape(c * d, c * d)  # row (y, pixel) = ∇ log p(y at pixel)
        p = torch.softmax(flat, 0).reshape(-1)
        return jl.T @ torch.diag(p) @ jl

    fn = dict(
        classif_logits=classif,
        classif_logsoftmax=logsoftmax,
        classif_binary_logits=binary,
        regression=regression,
        segmentation_logits=segmentation,
    )[variant]
    return _per_example_blocks(out, fn)


def fim(model, x, variant, covariance=None, names=None):
    """Mean over the batch of J_nᵀ F_n J_n."""
    out = model(x)
    h = fisher_output_matrix(out, variant, covariance)
    return ggn_from_output_hessian(model, x, h, names) / out.shape[0]


def empirical_fisher(model, x, y, nll_of_one, names=None):
    """(1/N) Σ ∇ℓ_n ∇ℓ_nᵀ with ℓ_n = nll_of_one(output_n, y_n)."""
    f, flat0 = flat_fn(model, names)
    rows = []
    for i in range(x.shape[0]):
        g = jacrev(lambda w, i=i: nll_of_one(f(w, x[i : i + 1])[0], y[i]))(flat0)
        rows.append(g)
    g = torch.stack(rows)
    return g.T @ g / x.shape[0]


def exact_hessian(model, x, y, loss_fn, names=None):
    f, flat0 = flat_fn(model, names)
    return hessian(lambda w: loss_fn(f(w, x), y))(flat0)


def output_cotangent_grams(post, s, hblocks, positions):
    """Σ_n Σ_groups Jgᵀ H_n Jg for the Jacobian of post(s)_n with respect to s_n.

    ``positions(J)`` maps one example's Jacobian (C, *s_shape) to a list of (C, d) matrices, one per
    group of positions whose cotangents are combined (expand: one per position; reduce: the sum).
    """
    total = 0
    for n in range(s.shape[0]):
        j = jacrev(lambda sn: post(sn[None])[0])(s[n].detach())  # (C, *s_shape)
        j = j.reshape(-1, *s.shape[1:])
        h = hblocks[n]
        for jg in positions(j):
            total = total + jg.T @ h @ jg
    return total / s.shape[0]


def fisher_blocks(out, variant):
    """Per-example output Fisher blocks, as a list."""
    h = fisher_output_matrix(out, variant)
    o = out[0].numel()
    return [h[i * o : (i + 1) * o, i * o : (i + 1) * o] for i in range(out.shape[0])]
