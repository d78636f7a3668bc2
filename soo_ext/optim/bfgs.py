"""Dense BFGS for small models and classical problems, on the fused ``soo::bfgs_direction`` op."""
from __future__ import annotations

import torch
from torch import Tensor

from .._support.options import Int
from ..curvature.dense_inverse import DenseInverseHessian
from .quasi_newton import QuasiNewton

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
