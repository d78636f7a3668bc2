"""The start of a step on flat blocks (MLBFGS, MFAC, GGT): gradients gathered, their finiteness
decided on the device, a non-finite gradient replaced by zeros."""
from __future__ import annotations

from torch import Tensor

from .._support.guard import SkipGuard, SkipWarner, fill_if_
from ..curvature.momentum_pairs import Block

__all__ = ["gather_guarded"]


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
        fill_if_(b.grad, guard.bad, 0)
    return guard, guard.ok.to(blocks[0].grad.dtype)
