"""L-BFGS: a drop-in replacement of ``torch.optim.LBFGS`` on the fused history kernels."""
from __future__ import annotations

import torch
from torch import Tensor

from .._support.options import Int, OneOf
from .._support.params import check_history_dtype
from ..curvature.lbfgs_history import LBFGSHistory
from .quasi_newton import QuasiNewton

__all__ = ["LBFGS"]


class LBFGS(QuasiNewton):
    r"""L-BFGS (Nocedal 1980; Liu & Nocedal 1989), a drop-in replacement of
    :class:`torch.optim.LBFGS` whose curvature pairs live in preallocated ring buffers
    (:class:`soo_ext.LBFGSHistory`) and whose direction is one fused kernel call.

    Same arguments, defaults, closure semantics, stopping rules and strong-Wolfe line search as
    torch's (on deterministic problems the iterates match up to rounding).  Beyond torch: param
    groups with their own ``lr`` (one shared history, torch's L-BFGS in rescaled variables),
    ``history_dtype``, ``on_nonfinite`` and data parallelism (``process_group=`` averages the
    losses).  Details, host syncs and state layout: docs/lbfgs.md.

    Args:
        params: iterable of params or of param-group dicts (only ``lr`` may differ).
        lr: learning rate (default: 1).
        max_iter: iterations per ``step`` (default: 20).
        max_eval: closure evaluations per ``step`` (default: ``max_iter * 5 // 4``).
        tolerance_grad: stop when ``max|g| <= tolerance_grad`` (default: 1e-7).
        tolerance_change: stop on a smaller change of loss or params (default: 1e-9).
        history_size: curvature pairs kept (default: 100).
        line_search_fn: None (fixed step) or ``'strong_wolfe'``.
        maximize: maximise the objective (default: False).
        history_dtype: storage dtype of the pairs (default: the params'; ``torch.bfloat16``
            with float32 params).
        on_nonfinite: ``'raise'`` (default: :class:`soo_ext.NonFiniteError`) or ``'skip'``;
            either way the params stay at the last finite iterate.
        process_group: data parallel: the ranks whose losses are averaged (default: None).

    Example::

        opt = soo_ext.LBFGS(model.parameters(), line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    """

    STATE_KEY = "history"
    OPTIONS = QuasiNewton.OPTIONS.extend({
        "history_size": Int(1),
        "history_dtype": OneOf(None, torch.float32, torch.float64, torch.bfloat16),
    })

    def __init__(self, params, lr: float | Tensor = 1, max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: str | None = None, *, maximize: bool = False,
                 history_dtype: torch.dtype | None = None, on_nonfinite: str = "raise",
                 process_group=None) -> None:
        super().__init__(params, {
            "lr": lr, "max_iter": max_iter, "max_eval": max_eval, "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change, "history_size": history_size,
            "line_search_fn": line_search_fn, "maximize": maximize,
            "history_dtype": history_dtype, "on_nonfinite": on_nonfinite}, process_group)

    def _check_curvature_params(self, params: list[Tensor], group: dict) -> None:
        check_history_dtype(params[0].dtype, group["history_dtype"])

    def _new_curvature(self, n: int, dtype: torch.dtype, device: torch.device,
                       group: dict) -> LBFGSHistory:
        return LBFGSHistory(n, group["history_size"], dtype, device, group["history_dtype"])

    def _check_curvature_unchanged(self, curvature: LBFGSHistory, group: dict) -> None:
        if curvature.history_size != group["history_size"]:
            raise ValueError("Invalid history_size: it cannot change after the first step")
