"""The start of a step on flat blocks (MLBFGS, MFAC, GGT): the option checks, gradients gathered,
their finiteness decided on the device, a non-finite gradient replaced by zeros."""
from __future__ import annotations

import numbers
import operator

import torch
from torch import Tensor

from .._support.guard import SkipGuard, SkipWarner
from .._support.options import OptionSpecs
from ..curvature.momentum_pairs import Block

__all__ = ["OptionChecks", "gather_guarded"]

# Option values that cannot change in place (a Tensor or a list can: those are checked every time)
_IMMUTABLE = (numbers.Number, str, type(None), torch.dtype)


class OptionChecks:
    """``specs.check_groups(groups)`` at every step, skipped while no option of any group has
    changed since the checks last passed.  They cost more than the ops of a small step, and
    options change rarely (an LR schedule changes ``lr``, which is then checked again).  The
    checks depend only on the options' types and values, so unchanged ones pass again."""

    def __init__(self, specs: OptionSpecs) -> None:
        self.specs = specs
        self._options = operator.itemgetter(*specs.specs)  # a group's option values, in C
        self._passed: tuple[list, list] | None = None  # their types and values at the last pass

    def __call__(self, groups: list[dict]) -> None:
        values = [self._options(g) for g in groups]
        types = [tuple(map(type, v)) for v in values]
        # types first: values are compared only when they are all of the immutable kinds passed
        if self._passed is None or types != self._passed[0] or values != self._passed[1]:
            self.specs.check_groups(groups)
            immutable = all(isinstance(x, _IMMUTABLE) for v in values for x in v)
            self._passed = (types, values) if immutable else None


def gather_guarded(blocks: list[Block], group: dict, state: dict, skips: SkipWarner, name: str,
                   message: str, *, params: bool = True, defer_raise: bool = False
                   ) -> tuple[SkipGuard, Tensor]:
    """Gather each block's gradients (negated with ``group['maximize']``) and, with ``params``,
    its params into its flat buffers; check the gradients under ``group['on_nonfinite']``
    (skips counted in ``state['nonfinite_steps']`` and watched by ``skips``; ``message`` names
    a non-finite gradient, ``defer_raise`` as :meth:`SkipGuard.check`).  From here every update
    must be masked by the guard, so that a non-finite step changes nothing: the gradients of a
    skipped step are replaced by zeros (NaN * 0 is NaN: replaced, not scaled).  Returns the
    guard and its ``ok`` as 0 or 1 in the gradients' dtype."""
    skips.watch(state["nonfinite_steps"])
    for b in blocks:
        if params:
            b.gather(group["maximize"], name)
        else:
            b.layout.gather_grads(b.grad, b.grad_views, name, group["maximize"])
    guard = SkipGuard.check([b.grad for b in blocks], group["on_nonfinite"],
                            state["nonfinite_steps"], message, defer_raise=defer_raise)
    for b in blocks:
        b.grad.masked_fill_(guard.bad, 0)
    return guard, guard.ok.to(blocks[0].grad.dtype)
