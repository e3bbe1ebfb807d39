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
from torch import nn

from .moments import column_square_sum


def _writable(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """Whether a product of ``inputs`` may be written into ``out`` (``out=`` needs one dtype and
    device, and takes no part in autograd)."""
    if any(t.dtype != out.dtype or t.device != out.device for t in inputs):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))


class Rule:
    """Base class. ``attrs(module)`` lists the parameters a rule computes, in registration order."""

    kinds: tuple = ()
    structured = True  # has a KFAC form
    kronecker = False  # the weight gradient has the Kronecker form of KronRule

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
    kronecker = True
    diagonal_input = False  # A is diagonal, stored as a vector (see diagonal_input_factor)

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

    def per_example_weight(self, module, a, g) -> torch.Tensor | None:
        """Per-example weight gradients ``(K, B, d_g, d_a)`` (order "ga", without the bias column) where
        the kind forms them faster than from its rows (convolutions: a grouped weight-gradient
        kernel), else None (the default): :class:`~nngeo_ops.nn.engine.accumulators.EKFACDiagAcc`
        then projects the rows."""
        return None

    def diag(self, module, a, g, out=None, scale=None) -> dict[str, torch.Tensor] | None:
        """Σ_{k,n} (∇θ)² per parameter ``{attr: tensor of its shape}``, without per-example tensors
        where a closed form exists (one position: (Σ_k g_k²)ᵀ a² for order "ga"), else None.

        ``out``: ``{attr: contiguous tensor of the parameter's shape, or flat}`` to write into
        (views of the whole diagonal's buffer, which a kind reshapes), or None; a kind may ignore
        it and return new tensors (the caller then copies them). ``scale``: a factor the result is
        multiplied by, folded into Σ_k g² (B × d_g numbers, not the d_g × d_a result).
        """
        arow, grow = self.rows(module, a, g)
        if arow.shape[1] != 1 or self.order != "ga":
            return None
        # Σ_k first (a does not depend on the column k), then one product (Σ_k g²)ᵀ a²: torch's
        # einsum of "kbg,ba->ga" does not sum k first (2.5× slower on the benchmark MLP)
        s = column_square_sum(grow[:, :, 0])  # a new tensor
        if scale is not None:
            s.mul_(scale)
        a2 = arow[:, 0].square()
        bias = getattr(module, "bias", None) is not None
        if out is not None and _writable(out["weight"], s, a2):
            torch.matmul(s.T, a2, out=out["weight"].view(s.shape[1], a2.shape[1]))
            if bias:
                torch.sum(s, 0, out=out["bias"])
            return out
        res = {"weight": (s.T @ a2).reshape(module.weight.shape)}
        if bias:
            res["bias"] = s.sum(0)
        return res

    # ------------------------------------------------------------------ what the accumulators ask
    def kfac_rows(self, module, a, g):
        """The rows of one call for the KFAC factors: ``(A rows (B·R, dA), B, R, G rows (K, B, R,
        dG))``. The default reshapes :meth:`rows`; a kind may give another layout of the same rows
        (convolutions: a transposed view of feature-major patches)."""
        ar, gr = self.rows(module, a, g)
        return ar.reshape(-1, ar.shape[-1]), ar.shape[0], ar.shape[1], gr

    def kfac_grad_rows(self, module, a, g):
        """The G rows (K, B, R, dG) of :meth:`kfac_rows` alone, for the columns of a batch
        streamed one column at a time other than the one A is taken at (the last). The default takes them from
        :meth:`kfac_rows`; a kind may skip its A side (convolutions: no patches)."""
        return self.kfac_rows(module, a, g)[3]

    def input_moment(self, module, a, g, ones: bool):
        """``(Σ [a; 1][a; 1]ᵀ over the rows of the call (without the 1 unless ``ones``), the number of
        rows, the G rows (K, B, R, dG))`` when the kind forms A's sum more cheaply than from its
        rows (convolutions: patches a chunk at a time), else None (the default): the accumulators
        then use :meth:`kfac_rows`. Only asked in the ``expand`` mode."""
        return None

    def diagonal_input_factor(self, module, a):
        """The diagonal of A of one call, for kinds with ``diagonal_input`` (Embedding)."""
        raise NotImplementedError(f"{type(self).__name__} has a dense input factor")
