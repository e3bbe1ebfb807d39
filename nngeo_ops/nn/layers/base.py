"""Layer rules: per-example gradients and Kronecker factors from a module's input and output cotangents.

A rule sees one call of a module: its input ``a`` (batch first) and the K batched cotangents ``g`` of
its output, shape ``(K, B, *out_shape)``. Everything is vectorised over K and B.

*Kronecker rules* (Linear, Conv1d, Conv2d, ConvTranspose2d, Embedding) write the per-example weight
gradient as a sum over positions r (sequence positions, pixels) of an outer product,

    ∇W_{k,n} = Σ_r  grow_{k,n,r} ⊗ arow_{n,r},

returned by :meth:`KronRule.rows` as ``arow`` (B, R, dA) and ``grow`` (K, B, R, dG). ``order`` tells how
the flat weight (row-major) relates to the rows: ``"ga"`` means W has shape (dG, dA) so
vec(∇W) = grow ⊗ arow (Linear, convolutions: A = inputs or patches, G = output cotangents); ``"ag"``
means W has shape (dA, dG) (Embedding: A = one-hot tokens; ConvTranspose2d: A = inputs, G = unfolded
output cotangents). For ``"ga"`` rules a bias is folded into A by appending a constant 1 to each arow.

*Elementwise rules* (BatchNorm, LayerNorm, GroupNorm, RMSNorm) have s = γ ⊙ x̂ + β, so
∇γ = Σ g ⊙ x̂ and ∇β = Σ g, summed over the positions that share a parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn


def _pairs(v, n):
    return tuple(v) if isinstance(v, tuple | list) else (v,) * n


def _conv_padding(module, n):
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * n
        total = [
            d * (k - 1) for d, k in zip(_pairs(module.dilation, n), _pairs(module.kernel_size, n))
        ]
        return tuple(t // 2 for t in total)
    return _pairs(pad, n)


def conv_geometry(module, a):
    """``(a, kernel, stride, dilation, padding)`` of a Conv1d/Conv2d call as a 2-d convolution:
    a 1-d convolution is a 2-d one over a height-1 image (``a`` gains that axis)."""
    n = 1 if isinstance(module, nn.Conv1d) else 2
    ks, st = _pairs(module.kernel_size, n), _pairs(module.stride, n)
    dl, pd = _pairs(module.dilation, n), _conv_padding(module, n)
    if n == 1:
        return a.unsqueeze(2), (1, *ks), (1, *st), (1, *dl), (0, *pd)
    return a, ks, st, dl, pd


class Rule:
    """Base class. ``attrs(module)`` lists the parameters a rule computes, in registration order."""

    kinds: tuple = ()
    structured = True  # has a KFAC form

    def supports(self, module: nn.Module) -> bool:
        return True

    def attrs(self, module) -> tuple[str, ...]:
        return tuple(a for a in ("weight", "bias") if getattr(module, a, None) is not None)


class KronRule(Rule):
    """A layer whose weight gradient is a sum of Kronecker products over weight-sharing positions
    (the KFAC form): subclasses give :meth:`rows`; ``order`` is the factor order of the weight
    (``"ga"``: output side first, as ``nn.Linear``'s ``(d_out, d_in)``; ``"ag"``: input side first).
    """

    order = "ga"
    bias_in_kron = True  # the bias is folded into A (only for order "ga")

    def rows(self, module, a, g):
        """The Kronecker rows of the weight gradient, ``(arow, grow)`` with ``arow`` of shape
        ``(B, R, d_a)`` (inputs per example and weight-sharing position) and ``grow`` ``(K, B, R, d_g)``
        (output cotangents per draw, example and position), such that the per-example weight gradient is
        ``Σ_r grow[k, b, r] ⊗ arow[b, r]``, a ``(d_g, d_a)`` matrix for ``order = "ga"`` and
        ``(d_a, d_g)`` for ``"ag"``, reshaped to the weight's shape. Subclasses implement it.
        """
        raise NotImplementedError

    def per_example(self, module, a, g) -> dict[str, torch.Tensor]:
        """Per-example gradients ``{attr: (K, B, *param_shape)}``."""
        arow, grow = self.rows(module, a, g)
        k, b = grow.shape[:2]
        if self.order == "ga":
            w = torch.einsum("kbrg,bra->kbga", grow, arow)
        else:
            w = torch.einsum("bra,kbrg->kbag", arow, grow)
        out = {"weight": w.reshape(k, b, *module.weight.shape)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = self.bias_grad(module, g, grow)
        return out

    def bias_grad(self, module, g, grow):
        """Per-example bias gradients ``(K, B, d_g)``: ``grow`` summed over the positions."""
        return grow.sum(2)

    def diag(self, module, a, g) -> dict[str, torch.Tensor] | None:
        """Σ_{k,n} (∇θ)², without per-example tensors where a closed form exists (one position)."""
        arow, grow = self.rows(module, a, g)
        if arow.shape[1] != 1 or self.order != "ga":
            return None
        g2, a2 = grow[:, :, 0].square(), arow[:, 0].square()
        out = {"weight": torch.einsum("kbg,ba->ga", g2, a2).reshape(module.weight.shape)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = g2.sum((0, 1))
        return out


class LinearRule(KronRule):
    """y = x Wᵀ + b on inputs (B, ..., d_in); extra middle dims are weight-sharing positions."""

    kinds = (nn.Linear,)

    def rows(self, module, a, g):
        b, k = a.shape[0], g.shape[0]
        return a.reshape(b, -1, a.shape[-1]), g.reshape(k, b, -1, g.shape[-1])


class ConvRule(KronRule):
    """KFC (Grosse & Martens, 2016): A = unfolded input patches, G = output cotangents per pixel."""

    kinds = (nn.Conv1d, nn.Conv2d)

    def supports(self, module):
        if module.groups != 1 or module.padding_mode != "zeros":
            return False
        if isinstance(module.padding, str) and module.padding == "same":
            n = 1 if isinstance(module, nn.Conv1d) else 2
            ks, ds = _pairs(module.kernel_size, n), _pairs(module.dilation, n)
            return all(d * (k - 1) % 2 == 0 for d, k in zip(ds, ks))
        return True

    def rows(self, module, a, g):
        a, ks, st, dl, pd = conv_geometry(module, a)
        patches = Fn.unfold(a, ks, dilation=dl, padding=pd, stride=st)  # (B, dA, R)
        k, b, c = g.shape[:3]
        return patches.transpose(1, 2), g.reshape(k, b, c, -1).transpose(2, 3)


class ConvTranspose2dRule(KronRule):
    """W has shape (C_in, C_out, kh, kw); ∇W = Σ_l x_l ⊗ unfold(g)_l over the input pixels l.

    The bias does not share this structure; its KFAC block is kept separate (exact, dense).
    """

    kinds = (nn.ConvTranspose2d,)
    order = "ag"
    bias_in_kron = False

    def supports(self, module):
        return module.groups == 1 and module.padding_mode == "zeros"

    def rows(self, module, a, g):
        k, b = g.shape[:2]
        gu = Fn.unfold(
            g.reshape(k * b, *g.shape[2:]),
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # (K·B, C_out·kh·kw, L_in)
        arow = a.reshape(b, a.shape[1], -1).transpose(1, 2)
        return arow, gu.reshape(k, b, gu.shape[1], -1).transpose(2, 3)

    def bias_grad(self, module, g, grow):
        return g.reshape(*g.shape[:3], -1).sum(-1)


class EmbeddingRule(KronRule):
    """W (V, d): ∇W = Σ_r onehot(token_r) ⊗ g_r. A is diagonal (token counts) in the expand form."""

    kinds = (nn.Embedding,)
    order = "ag"

    def supports(self, module):
        return not module.scale_grad_by_freq and not module.sparse

    def onehot(self, module, a):
        oh = Fn.one_hot(a.reshape(a.shape[0], -1), module.num_embeddings)
        if module.padding_idx is not None:  # torch never updates the padding row
            oh[..., module.padding_idx] = 0
        return oh

    def rows(self, module, a, g):
        k, b = g.shape[:2]
        oh = self.onehot(module, a).to(g.dtype)
        return oh, g.reshape(k, b, -1, g.shape[-1])

    def token_counts(self, module, a):
        return self.onehot(module, a).sum((0, 1))


class NormRule(Rule):
    """Elementwise affine after a normalisation: s = γ ⊙ x̂ + β."""

    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    structured = True

    def xhat(self, m, a):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            batch_stats = m.training or m.running_mean is None
            rm, rv = (None, None) if batch_stats else (m.running_mean, m.running_var)
            return Fn.batch_norm(a, rm, rv, None, None, batch_stats, 0.0, m.eps)
        if isinstance(m, nn.LayerNorm):
            return Fn.layer_norm(a, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return Fn.group_norm(a, m.num_groups, None, None, m.eps)
        return Fn.rms_norm(a, m.normalized_shape, None, m.eps)

    def reduce(self, m, t):
        """(K, B, *out_shape) -> (K, B, *param_shape), summing positions that share a parameter."""
        if isinstance(m, nn.LayerNorm | nn.RMSNorm):
            nd = len(m.normalized_shape)
            return t.reshape(*t.shape[:2], -1, *t.shape[t.dim() - nd :]).sum(2)
        return t.reshape(*t.shape[:3], -1).sum(-1)  # channel is dim 1 of the output

    def per_example(self, module, a, g):
        xh = self.xhat(module, a.detach())
        out = {"weight": self.reduce(module, g * xh)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = self.reduce(module, g)
        return out

    def diag(self, module, a, g):
        return None


RULES: list[Rule] = [LinearRule(), ConvRule(), ConvTranspose2dRule(), EmbeddingRule(), NormRule()]


def register_layer_rule(rule: Rule, first: bool = True) -> Rule:
    """Add a layer kind: ``rule`` (an instance of a :class:`KronRule` or :class:`Rule` subclass
    whose ``kinds`` names the module classes it handles) is used for those modules by every
    representation from then on. ``first=True`` puts it before the built-in rules, so that it
    overrides them for a subclass of a built-in module. Returns ``rule``.

    A :class:`KronRule` gives ``rows(module, a, g) -> (arow (B, R, dA), grow (K, B, R, dG))`` with
    the per-example weight gradient ``∇W = Σ_r grow_r ⊗ arow_r`` (order ``"ga"``: W of shape
    (dG, dA), flattened row-major; a bias is folded into A by a trailing 1); the per-example
    gradients, diagonal and KFAC factors of the layer all follow from it.
    """
    if not isinstance(rule, Rule) or not rule.kinds:
        raise TypeError(
            "register_layer_rule expects an instance of a Rule subclass with `kinds` set to the "
            f"module classes it handles, got {rule!r}"
        )
    RULES.insert(0, rule) if first else RULES.append(rule)
    return rule


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of a module, or None when the module needs the generic (torch.func) path."""
    for rule in RULES:
        if type(module) in rule.kinds and rule.supports(module):
            return rule
    return None
