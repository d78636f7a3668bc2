"""GGT (Agarwal et al. 2019): full-matrix adaptive regularisation from a window of recent
gradients, on the window kernels."""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .._support.options import Number
from .shampoo import _Betas
from ..curvature.gradient_window import GradientWindow, ggt_coefficients
from .window import DEFAULT_MAX_STATE_BYTES, WindowOptimizer

__all__ = ["GGT"]


def _warn_short_window(betas, eps, window) -> None:
    """The part of m from gradients older than the window is off its span, scaled by 1 / eps:
    warn when it can outweigh the rest (beta1^window / eps > 1)."""
    amplification = betas[0] ** window / eps  # the options are valid: beta1 < 1, eps > 0
    if amplification > 1:
        warnings.warn(f"GGT: window={window} is short for beta1={betas[0]}: the momentum's part "
                      f"from gradients older than the window is amplified by beta1^window / eps "
                      f"= {amplification:.3g}, which can diverge; use a window above "
                      f"log(eps) / log(beta1) = {math.log(eps) / math.log(betas[0]):.0f}, or a "
                      "smaller beta1 (docs/ggt.md)", RuntimeWarning, stacklevel=3)


class GGT(WindowOptimizer):
    r"""GGT, full-matrix adaptive regularisation with a low-rank window (Agarwal, Bullins, Chen,
    Hazan, Singh, Zhang & Zhang, "Efficient Full-Matrix Adaptive Regularization", ICML 2019).

    ``G = [g_t, beta2 g_{t-1}, ...]`` holds the last ``window`` = r gradients (all params, one
    flat vector), ``m <- beta1 m + g`` their momentum.  With ``G^T G = V diag(sigma^2) V^T`` and
    ``U = G V diag(sigma)^-1`` the direction is the paper's
    ``U diag(sigma + eps)^-1 U^T m + (m - U U^T m) / eps``: ``(G G^T)^{1/2} + eps I`` inverted
    on the window's span, ``1/eps`` off it.  Per step: one pass over the window (the Gram
    matrix's new row and ``G^T m``), an ``r x r`` eigendecomposition in float64 on the device,
    one pass for the combination; no host sync on the CPU (``torch.linalg.eigh`` on CUDA waits
    for its status).  The step is ``p <- p - lr d`` (``momentum`` > 0: through SGD momentum).
    Memory: ``r n`` window entries.  See docs/ggt.md.

    Args:
        params: iterable of params or of param-group dicts (float32 or float64, one dtype and one
            device; ``lr``, ``momentum`` and ``weight_decay`` may differ between groups).
        lr: learning rate (default: 0.1, tuned on bench train's development cases: on the
            window's span ``|d|`` is about ``1 / sqrt(1 - beta1^2)`` whatever n, so lr is
            nearly the step's length; docs/ggt.md).
        betas: ``(beta1, beta2)``, of ``m`` and of the window's decay (default: (0.9, 1.0), the
            authors' code: no decay).
        eps: epsilon (default: 1e-4, the paper's).
        weight_decay: L2 penalty added to the gradient (default: 0).
        momentum: SGD momentum on the direction (default: 0, as the paper).
        window: r, gradients kept (default: 100, the authors' code's).
        window_dtype, max_state_bytes, on_nonfinite, maximize: as :class:`soo_ext.MFAC`.

    Example::

        opt = soo_ext.GGT(model.parameters(), lr=0.1)  # window 100
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    """

    NAME = "GGT"
    OPTIONS = WindowOptimizer.OPTIONS.extend({
        "betas": _Betas(), "eps": Number(0, low_open=True, high_open=True)})

    def __init__(self, params, lr: float = 0.1, betas: tuple[float, float] = (0.9, 1.0),
                 eps: float = 1e-4, weight_decay: float = 0.0, momentum: float = 0.0,
                 window: int = 100, *, window_dtype: torch.dtype | None = None,
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES, on_nonfinite: str = "skip",
                 maximize: bool = False) -> None:
        super().__init__(params, {
            "lr": lr, "betas": betas, "eps": eps, "momentum": momentum,
            "weight_decay": weight_decay, "window": window, "window_dtype": window_dtype,
            "max_state_bytes": max_state_bytes, "on_nonfinite": on_nonfinite,
            "maximize": maximize})
        _warn_short_window(betas, eps, window)

    def _direction(self, g: Tensor, window: GradientWindow, state: dict, group: dict,
                   guard, okf: Tensor, out: Tensor) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g)
        m = state["exp_avg"]
        beta1, beta2 = group["betas"]
        m.mul_(guard.unless_skipped(beta1, okf)).addcmul_(g, okf)  # g holds wd p when skipped
        D = window.push(g, guard.ok, [m])
        weights = None if beta2 == 1 else torch.pow(beta2, window.ages())  # 1: unweighted
        coef, base_coef = ggt_coefficients(window.K, D[:, 1], weights, group["eps"])
        window.combine(out, coef, m, base_coef)
