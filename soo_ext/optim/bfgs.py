"""Dense BFGS for small models and classical problems, on the fused ``soo::bfgs_direction`` op."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._support.options import Int
from ..curvature.dense_inverse import DenseInverseHessian
from .quasi_newton import _C2, QuasiNewton, _Eval, _Run

__all__ = ["BFGS"]

DEFAULT_MAX_STATE_BYTES = 1 << 30  # H of 16384 float32 or 11585 float64 params


class BFGS(QuasiNewton):
    r"""Dense BFGS (Nocedal & Wright, ch. 6) with the closure interface, stopping rules and line
    search of :class:`torch.optim.LBFGS` / :class:`soo_ext.LBFGS`.

    The ``n x n`` inverse-Hessian approximation over the flat vector of all params
    (:class:`~soo_ext.curvature.dense_inverse.DenseInverseHessian`) gets the rank-2 BFGS update
    for every accepted pair with ``y.s > 1e-10``, fused with the direction ``-H g`` in one op.
    Iteration, param groups, ``on_nonfinite``, resume and ``process_group`` are those of
    :class:`soo_ext.LBFGS`.  ``H`` costs ``n^2`` elements: models whose ``H`` would exceed
    ``max_state_bytes`` are refused when the optimizer is built.  Details: docs/bfgs.md.

    Args:
        params: iterable of params or of param-group dicts.
        lr: learning rate (default: 1).
        max_iter: maximal number of iterations per ``step`` (default: 20).
        max_eval: maximal number of closure evaluations per ``step``
            (default: ``max_iter * 5 // 4``).
        tolerance_grad: stop when ``max|g| <= tolerance_grad`` (default: 1e-7).
        tolerance_change: stop on a smaller change of loss or params (default: 1e-9).
        line_search_fn: ``None`` (fixed step) or ``'strong_wolfe'``.
        maximize: maximise the objective instead of minimising it (default: False).
        on_nonfinite: ``'raise'`` (default) or ``'skip'``.
        max_state_bytes: largest allowed size of ``H`` in bytes (default: 1 GiB).
        process_group: the data-parallel ranks whose losses are averaged (default None).

    Example::

        opt = soo_ext.BFGS(model.parameters(), line_search_fn="strong_wolfe")
        opt.step(closure)  # the closure of torch.optim.LBFGS: zero_grad, backward, return loss
    """

    STATE_KEY = "inverse_hessian"
    OPTIONS = QuasiNewton.OPTIONS.extend({"max_state_bytes": Int(1)})
    PAIR_SLOPE = True
    STOP_ON_FAILED_SEARCH = True

    def __init__(self, params, lr: float | Tensor = 1, max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9, line_search_fn: str | None = None, *,
                 maximize: bool = False, on_nonfinite: str = "raise",
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES, process_group=None) -> None:
        super().__init__(params, {
            "lr": lr, "max_iter": max_iter, "max_eval": max_eval, "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change, "line_search_fn": line_search_fn,
            "maximize": maximize, "on_nonfinite": on_nonfinite,
            "max_state_bytes": max_state_bytes}, process_group)

    def _check_curvature_params(self, params: list[Tensor], group: dict) -> None:
        n = sum(p.numel() for p in params)
        needed = n * n * params[0].element_size()
        if needed > group["max_state_bytes"]:
            raise ValueError(
                f"BFGS: the inverse Hessian of these {n} parameters needs {needed / 2**20:.1f} MiB "
                f"(n^2 x {params[0].element_size()} bytes), more than max_state_bytes = "
                f"{group['max_state_bytes'] / 2**20:.1f} MiB; use soo_ext.LBFGS, or raise "
                "max_state_bytes if the memory is there")

    def _new_curvature(self, n: int, dtype: torch.dtype, device: torch.device,
                       group: dict) -> DenseInverseHessian:
        return DenseInverseHessian(n, dtype, device)

    # With the strong-Wolfe line search BFGS departs from torch.optim.LBFGS's iteration in three
    # places (docs/bfgs.md, "Algorithm"); with a fixed step it keeps torch's rules.

    def _pair_options(self, run: _Run, group: dict, t: float, yd: float,
                      gd_prev: float | None) -> dict | None:
        if group["line_search_fn"] is None:
            return super()._pair_options(run, group, t, yd, gd_prev)
        if gd_prev is None:
            return None
        # s = t d, y.s = t yd, g_prev.s = t gd_prev < 0.  The pair is stored unless y.s is at
        # the rounding level of -g_prev.s (L-BFGS-B's test); the line search makes y.s >=
        # (1 - c2) (-g_prev.s) otherwise.  torch's y.s > 1e-10 is an absolute threshold: near a
        # minimiser whose loss is O(1) it skips every pair and the iteration stalls.
        ys, sg = t * yd, t * gd_prev
        if not ys > torch.finfo(run.layout.dtype).eps * -sg:
            return None
        # Restricted self-scaling (Oren & Luenberger's factor, applied only when it enlarges H):
        # with B = H^-1, s.B.s = -t g_prev.s (B s = -t g_prev), so the factor is known on the
        # host.  When y.s < s.B.s, H underestimates the inverse curvature along s; it is then
        # multiplied by s.B.s / y.s before the update (at most t / (1 - c2), as only pairs of a
        # successful search, y.s >= (1 - c2) (-g_prev.s), are scaled).  It is never shrunk:
        # BFGS corrects a too large H within a few steps, a too small one only slowly.
        scale = -t * sg / ys if ys >= (1 - _C2) * -sg else 1.0
        return {"rescale_first": False, "h_scale": max(1.0, scale)}

    def _line_search_budget(self, run: _Run, loss: float, gtd: float, left: int) -> int:
        # At most 25 evaluations (torch's own default for its line search; torch.optim.LBFGS
        # allows what is left of max_eval, so that with a large max_eval and tolerance_change=0
        # one failing search can take thousands).  Once the decrease the direction promises to
        # first order, -g.d, is below the rounding of the loss, no search can measure progress:
        # only the first trial (the quasi-Newton step) is tried, and one more; a failure ends the
        # step (STOP_ON_FAILED_SEARCH).
        if -gtd <= torch.finfo(run.layout.dtype).eps * abs(loss):
            return min(left, 1)
        return min(left, 25)

    def _trial_step(self, state: dict, group: dict, ev: _Eval, loss: float,
                    prev_loss: float | None, gtd: float) -> float:
        if group["line_search_fn"] is None or prev_loss is None:
            return super()._trial_step(state, group, ev, loss, prev_loss, gtd)
        # Nocedal & Wright eq. 3.60 (as scipy's BFGS): the step that would repeat the last
        # decrease on the linear model, 1 at most; 1 when the loss did not decrease.
        t = 1.01 * 2 * (loss - prev_loss) / gtd
        return min(1.0, t) if t > 0 and math.isfinite(t) else 1.0
