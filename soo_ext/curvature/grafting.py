"""Grafting (Agarwal et al. 2020; as in Distributed Shampoo): the diagonal optimizer whose step
size a Shampoo block takes (its direction is Shampoo's), and the direction of params without
factors.  One interface, as the preconditioners': ``update`` the statistics, ``precondition``
a gradient."""
from __future__ import annotations

import torch
from torch import Tensor

from .._support.guard import SkipGuard

__all__ = ["AdaGradGrafting", "AdamGrafting", "SGDGrafting", "make_grafting"]


class SGDGrafting:
    """``A = g`` (also the direction of ``grafting=None``, which does not rescale)."""

    state_key: str | None = None  # the per-param state entry it keeps

    def __init__(self, epsilon: float, beta2: float) -> None:
        self.epsilon, self.beta2 = epsilon, beta2

    def update(self, states: list[Tensor], grads: list[Tensor], guard: SkipGuard) -> None:
        """Add this step's gradients (zero on a skipped step) to the statistics."""

    def precondition(self, states: list[Tensor], grads: list[Tensor],
                     taken: Tensor) -> list[Tensor]:
        """The grafting directions (``taken``: steps taken, for bias corrections)."""
        return grads


class AdaGradGrafting(SGDGrafting):
    """``s <- s + g^2``, ``A = g / (sqrt(s) + epsilon)``."""

    state_key = "graft_state"

    def update(self, states, grads, guard):
        for s, g in zip(states, grads):
            s.addcmul_(g, g)

    def precondition(self, states, grads, taken):
        return [g / (s.sqrt() + self.epsilon) for s, g in zip(states, grads)]


class AdamGrafting(SGDGrafting):
    """RMSProp with bias correction (Adam without a first moment of its own):
    ``v <- b v + (1 - b) g^2``, ``A = g / (sqrt(v) / sqrt(1 - b^t) + epsilon)``."""

    state_key = "graft_state"

    def update(self, states, grads, guard):
        b2 = self.beta2
        keep = guard.unless_skipped(b2, states[0]) if states else None
        for v, g in zip(states, grads):
            v.mul_(keep).addcmul_(g, g, value=1 - b2)

    def precondition(self, states, grads, taken):
        root_bc = torch.sqrt(1 - torch.pow(self.beta2, taken)).to(grads[0].dtype) if grads \
            else None
        return [g / ((v.sqrt() / root_bc) + self.epsilon) for v, g in zip(states, grads)]


def make_grafting(kind: str | None, epsilon: float, beta2: float) -> SGDGrafting:
    """The grafting method of ``grafting=kind`` ('sgd', 'adagrad', 'adam' or None)."""
    cls = {"adagrad": AdaGradGrafting, "adam": AdamGrafting}.get(kind, SGDGrafting)
    return cls(epsilon, beta2)
