"""Grafting (Agarwal et al. 2020; as in Distributed Shampoo): the diagonal optimizer whose step
size a Shampoo block takes (its direction is Shampoo's), and the direction of params without
factors.  One interface, as the preconditioners': ``update`` the statistics, ``precondition``
a gradient; both take lists of tensors (each param's, or one flat buffer) and run
multi-tensor ops."""
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

    def precondition(self, states: list[Tensor], grads: list[Tensor], taken: Tensor,
                     out: list[Tensor] | None = None) -> list[Tensor]:
        """The grafting directions (``taken``: steps taken, for bias corrections), into ``out``
        if given (SGD's are the gradients themselves)."""
        return grads


class AdaGradGrafting(SGDGrafting):
    """``s <- s + g^2``, ``A = g / (sqrt(s) + epsilon)``."""

    state_key = "graft_state"

    def update(self, states, grads, guard):
        torch._foreach_addcmul_(states, grads, grads)

    def precondition(self, states, grads, taken, out=None):
        denom = torch._foreach_sqrt(states)
        torch._foreach_add_(denom, self.epsilon)
        return _divided(grads, denom, out)


class AdamGrafting(SGDGrafting):
    """RMSProp with bias correction (Adam without a first moment of its own):
    ``v <- b v + (1 - b) g^2``, ``A = g / (sqrt(v) / sqrt(1 - b^t) + epsilon)``."""

    state_key = "graft_state"

    def update(self, states, grads, guard):
        if states:
            torch._foreach_mul_(states, guard.unless_skipped(self.beta2, states[0]))
            torch._foreach_addcmul_(states, grads, grads, value=1 - self.beta2)

    def precondition(self, states, grads, taken, out=None):
        if not grads:
            return []
        root_bc = torch.sqrt(1 - torch.pow(self.beta2, taken)).to(grads[0].dtype)
        denom = torch._foreach_sqrt(states)
        torch._foreach_div_(denom, root_bc)
        torch._foreach_add_(denom, self.epsilon)
        return _divided(grads, denom, out)


def _divided(grads: list[Tensor], denom: list[Tensor], out: list[Tensor] | None) -> list[Tensor]:
    """``g / d`` for each pair, into ``out`` if given."""
    if out is None:
        return torch._foreach_div(grads, denom)
    for g, d, o in zip(grads, denom, out):
        torch.div(g, d, out=o)
    return out


def make_grafting(kind: str | None, epsilon: float, beta2: float) -> SGDGrafting:
    """The grafting method of ``grafting=kind`` ('sgd', 'adagrad', 'adam' or None)."""
    cls = {"adagrad": AdaGradGrafting, "adam": AdamGrafting}.get(kind, SGDGrafting)
    return cls(epsilon, beta2)
