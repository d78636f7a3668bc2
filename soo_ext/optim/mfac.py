"""M-FAC (Frantar, Kurtic & Alistarh 2021): the inverse of a sliding window's empirical Fisher
applied to the gradient, on the window kernels."""
from __future__ import annotations

import torch
from torch import Tensor

from .._support.options import Number, OneOf
from ..curvature.gradient_window import GradientWindow, MFACInverse
from .window import DEFAULT_MAX_STATE_BYTES, WindowOptimizer

__all__ = ["MFAC"]

# solver='auto' keeps the inverse (O(m^2) a step) from this window size on, and factorises
# (O(m^3)) below it, where a few small ops cost more than the flops (docs/mfac.md#cost).
UPDATE_FROM_WINDOW = 128


class MFAC(WindowOptimizer):
    r"""M-FAC, matrix-free inverse-Fisher preconditioning (Frantar, Kurtic & Alistarh, "M-FAC:
    Efficient Matrix-Free Approximations of Second-Order Information", NeurIPS 2021).

    The last ``window`` = m gradients ``g_i`` (of all params, one flat vector) define
    ``F = damping I + (1/m) sum_i g_i g_i^T``; each step pushes the new gradient (the oldest
    drops out) and moves along ``F^{-1} (g + wd p)``, through SGD with momentum.  Per step: one
    pass over the window for its dot products with ``g`` (also the Gram matrix's new row), an
    ``m x m`` solve in float64 on the device, one pass for the combination; no host sync.  The
    window starts as zeros (so F's ``1/m`` is fixed from the first step, as the authors' code).
    Memory: ``m n`` window entries.  See docs/mfac.md.

    Args:
        params: iterable of params or of param-group dicts (float32 or float64, one dtype and one
            device; ``lr``, ``momentum`` and ``weight_decay`` may differ between groups).
        lr: learning rate (default: 0.03, tuned with ``damping`` on bench train's development
            cases; the authors' 1e-3 goes with their window of 1024: see docs/mfac.md).
        momentum: SGD momentum on the direction, ``buf <- momentum buf + d`` (default: 0; the
            authors average, ``(1 - momentum) d``: their lr is ours over ``1 - momentum``).
        weight_decay: L2 penalty added to the gradient that is preconditioned (default: 0).
        window: m, gradients kept (default: 32; the paper's 1024 is a GPU setting).
        damping: lambda (default: 1e-2; the authors' 1e-5 lets the step grow as 1 / |g|).
        solver: ``'cholesky'`` (a factorisation a step, O(m^3)), ``'update'`` (the inverse kept
            and carried across each replacement, O(m^2)) or ``'auto'`` (default: ``'update'``
            from window 128 on, where it is the faster).
        window_dtype: storage of the window (default: the params'; ``torch.bfloat16`` halves it
            for float32 params; dot products are summed in float64 either way).
        max_state_bytes: largest window (and Gram matrix) allowed, in bytes (default: 1 GiB).
        on_nonfinite: ``'skip'`` (default: the step changes nothing) or ``'raise'``.
        maximize: maximise the objective (default: False).

    Example::

        opt = soo_ext.MFAC(model.parameters(), lr=0.03, window=32)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    """

    NAME = "MFAC"
    OPTIONS = WindowOptimizer.OPTIONS.extend({
        "damping": Number(0, low_open=True, high_open=True),
        "solver": OneOf("auto", *MFACInverse.ROUTES)})

    def __init__(self, params, lr: float = 0.03, momentum: float = 0.0,
                 weight_decay: float = 0.0, window: int = 32, damping: float = 1e-2, *,
                 solver: str = "auto", window_dtype: torch.dtype | None = None,
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES, on_nonfinite: str = "skip",
                 maximize: bool = False) -> None:
        super().__init__(params, {
            "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "window": window,
            "damping": damping, "solver": solver, "window_dtype": window_dtype,
            "max_state_bytes": max_state_bytes, "on_nonfinite": on_nonfinite,
            "maximize": maximize})

    @staticmethod
    def _route(group: dict) -> str:
        if group["solver"] != "auto":
            return group["solver"]
        return "update" if group["window"] >= UPDATE_FROM_WINDOW else "cholesky"

    def _square_matrices(self, group: dict) -> int:
        return 2 if self._route(group) == "update" else 1  # the Gram matrix, its kept inverse

    def _direction(self, g: Tensor, window: GradientWindow, state: dict, group: dict,
                   guard, okf: Tensor, out: Tensor) -> None:
        D = window.push(g, guard.ok)
        inverse = MFACInverse(state, window, group["damping"], self._route(group))
        coef, base, base_coef = inverse.coefficients(g, D[:, 0], guard.ok, state["step"])
        window.combine(out, coef, base, base_coef)
