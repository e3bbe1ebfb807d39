"""Elastic weight consolidation (Kirkpatrick et al. 2017) over lazy Fisher operators.

After each task t the Fisher F_t of that task (a *mean* over its examples, any representation) and
the parameters w_t at its end are kept; training on later tasks adds

    penalty(w) = ½·λ·Σ_t (w − w_t)ᵀ F_t (w − w_t)

to the loss (λ = ``strength``). The Fishers stay operators (``F_t.op``), never densified, and each
term costs one product F_t·(w − w_t). With ``online=True`` (Schwarz et al. 2018) a single running
Fisher F* ← γ·F* + F_t (γ = ``decay``) is kept as one lazy ops sum, anchored at the latest w_t:
penalty(w) = ½·λ·(w − w_t)ᵀ F* (w − w_t), one product of that sum (which ops folds where the
representation allows, e.g. diagonals into one diagonal).

The penalty is differentiable in the model's parameters: its gradient λ·Σ_t F_t (w − w_t) is
exact (F_t symmetric) and comes from the same products; second derivatives are not provided.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ArgumentTypeError, InvalidArgumentError
from ..nn import FIM, LayerCollection, PMatKFAC


class EWC:
    """The EWC penalty of a model over the tasks added so far (see the module docstring).

    Args:
        model: the network being trained (its parameters are w).
        strength: λ ≥ 0.
        online: keep one running Fisher (online EWC) instead of one per task.
        decay: γ ∈ [0, 1] of online EWC.
        layer_collection: the parameters covered (default all trainable ones).
    """

    def __init__(
        self,
        model: nn.Module,
        strength: float = 1.0,
        online: bool = False,
        decay: float = 1.0,
        layer_collection: LayerCollection | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not strength >= 0:
            raise InvalidArgumentError(f"strength must be ≥ 0, got {strength!r}")
        if not 0 <= decay <= 1:
            raise InvalidArgumentError(f"decay must lie in [0, 1], got {decay!r}")
        self.model, self.strength = model, float(strength)
        self.online, self.decay = bool(online), float(decay)
        self.lc = layer_collection or LayerCollection.from_model(model)
        self.terms: list[tuple[object, torch.Tensor]] = []  # (operator, anchor w_t)

    def add_task(
        self,
        loader,
        representation=PMatKFAC,
        variant: str = "classif_logits",
        fisher=None,
        progress=False,
    ):
        """Compute the Fisher of a finished task at the current parameters (or take ``fisher``, a
        representation over the same layer collection) and add its term. Returns the Fisher."""
        if fisher is None:
            fisher = FIM(
                self.model,
                loader,
                representation,
                variant=variant,
                layer_collection=self.lc,
                progress=progress,
            )
        elif fisher.layer_collection != self.lc:
            raise InvalidArgumentError(
                "the Fisher is over another layer collection than the EWC penalty; build it with "
                "layer_collection=ewc.lc"
            )
        anchor = self.lc.flat_parameters(self.model)
        if self.online and self.terms:
            (old, _) = self.terms[0]
            self.terms = [((self.decay * old + fisher.op).simplify(), anchor)]
        else:
            self.terms.append((fisher.op, anchor))
        return fisher

    @property
    def n_tasks(self) -> int:
        """The number of Fisher terms kept: the tasks added (1 with online EWC after a task)."""
        return len(self.terms)

    def _w(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.lc.parameters(self.model)])

    def penalty(self) -> torch.Tensor:
        """½·λ·Σ_t (w − w_t)ᵀ F_t (w − w_t), a 0-d tensor differentiable in the parameters."""
        w = self._w()
        total = w.new_zeros(())
        for op, anchor in self.terms:
            d = w - anchor
            fd = op @ d.detach()
            # value ½ dᵀFd, gradient F d (F symmetric): one product per term
            total = total + torch.dot(d, fd) - 0.5 * torch.dot(d.detach(), fd)
        return self.strength * total
